-- Weighted rank fusion per (query, mined passage): R = sum of w/(k + rank) over QL, RC, kNN, BM25, ranked per query
with

settings as (
    select
        getvariable('select_rrf_k')::bigint as rrf_k,
        -- Weights arrive rounded to the millionth (pipeline/params/selection.py), so in millionths they are
        -- integers and R below stays a fraction of integers. Gecko: ql 1, rc 1, knn 0.
        round(getvariable('select_weights_ql')::double * 1000000)::bigint as ql_units,
        round(getvariable('select_weights_rc')::double * 1000000)::bigint as rc_units,
        round(getvariable('select_weights_knn')::double * 1000000)::bigint as knn_units,
        round(getvariable('select_weights_bm25')::double * 1000000)::bigint as bm25_units
),

scores as (
    select
        query_id,
        passage_id,
        knn_rank::bigint as knn_rank,
        ql_rank::bigint as ql_rank,
        rc_rank::bigint as rc_rank,
        ql_sum,
        ql_mean,
        rc_logodds
    from llm_scores
),

neighbor_scores as (
    select query_id, passage_id, knn_score, bm25_rank::bigint as bm25_rank, bm25_score from neighbors
),

seeds as (
    select query_id, passage_id as seed_id from queries
),

-- k + rank per signal. A signal with weight 0 is never read (score.methods may have left its ranks
-- NULL): it stands as 1, the neutral factor of the products below.
denominators as (
    select
        scores.*,
        neighbor_scores.bm25_rank,
        settings.*,
        if(settings.ql_units = 0, 1, settings.rrf_k + scores.ql_rank) as ql_denominator,
        if(settings.rc_units = 0, 1, settings.rrf_k + scores.rc_rank) as rc_denominator,
        if(settings.knn_units = 0, 1, settings.rrf_k + scores.knn_rank) as knn_denominator,
        if(settings.bm25_units = 0, 1, settings.rrf_k + neighbor_scores.bm25_rank) as bm25_denominator
    from scores
    cross join settings
    left join neighbor_scores
        on neighbor_scores.query_id = scores.query_id and neighbor_scores.passage_id = scores.passage_id
),

-- A weighted signal whose rank is NULL: it was not scored, and the build must say which weight asks for it.
unranked as (
    select
        *,
        case
            when ql_denominator is null then 'ql'
            when rc_denominator is null then 'rc'
            when knn_denominator is null then 'knn'
            when bm25_denominator is null then 'bm25'
        end as unranked_signal
    from denominators
),

-- R written as one fraction of integers: the sum of units x the other three factors, over the product
-- of all four (x 10^6 for the units). Computed in doubles, where a product or sum of integers is
-- exact as long as it stays below 2^53 (and a rounded one cannot fall below 2^53 if the exact one is
-- above: rounding is monotonic), so `fits_double` below is a sound test.
fractions as (
    select
        query_id,
        passage_id,
        case
            when unranked_signal is not null then error('select.weights.' || unranked_signal || ' is above 0 but '
                || 'there is no ' || unranked_signal || '_rank for query ' || query_id || ', passage '
                || passage_id || ': score it (score.methods; bm25: the neighbors stage) or set select.weights.'
                || unranked_signal || ' to 0')
            else ql_units::double * rc_denominator * knn_denominator * bm25_denominator
                + rc_units::double * ql_denominator * knn_denominator * bm25_denominator
                + knn_units::double * ql_denominator * rc_denominator * bm25_denominator
                + bm25_units::double * ql_denominator * rc_denominator * knn_denominator
        end as numerator,
        ql_denominator::double * rc_denominator * knn_denominator * bm25_denominator * 1000000 as denominator,
        ql_units, rc_units, knn_units, bm25_units, ql_denominator, rc_denominator, knn_denominator, bm25_denominator,
        -- The RC tie-breaker counts only when RC is fused (its ranks may be NULL otherwise).
        case when rc_units > 0 then rc_rank end as rc_tie_rank,
        ql_rank,
        rc_rank,
        knn_rank,
        bm25_rank,
        ql_sum,
        ql_mean,
        rc_logodds
    from unranked
),

-- One division of the exact fraction: IEEE division rounds the exact quotient, so sums that are
-- equal on paper (1/2 + 1/6 = 1/3 + 1/3) get the same double, and a tie is a true tie that goes to
-- the tie-breakers below instead of to floating-point noise. Beyond 2^53 (rrf_k + ranks in the
-- thousands, large weights) the fraction is redone in 128-bit integers and reduced by its gcd first,
-- which brings it back to doubles exactly whenever the reduced fraction fits. CASE evaluates that
-- branch only for the rows that need it: with four signals fused, ranks past about 90 (top_n plus
-- bm25.top_n) and weights of 1 take it; below that none do.
fused as (
    select
        *,
        case
            when fits_double then numerator / denominator
            else exact_numerator // gcd(exact_numerator, exact_denominator)
                / (exact_denominator // gcd(exact_numerator, exact_denominator))
        end as fused_score
    from (
        select
            *,
            -- NULL where the doubles are exact: the 128-bit products are computed only where needed.
            case when not fits_double then ql_units::hugeint * rc_denominator * knn_denominator * bm25_denominator
                + rc_units::hugeint * ql_denominator * knn_denominator * bm25_denominator
                + knn_units::hugeint * ql_denominator * rc_denominator * bm25_denominator
                + bm25_units::hugeint * ql_denominator * rc_denominator * knn_denominator end as exact_numerator,
            case when not fits_double then
                ql_denominator::hugeint * rc_denominator * knn_denominator * bm25_denominator * 1000000
                end as exact_denominator
        from (
            select *, numerator < 9007199254740992 and denominator < 9007199254740992 as fits_double
            from fractions
        )
    )
),

final as (
    select
        fused.query_id,
        fused.passage_id,
        -- Ties: the LLM's direct relevance judgement first (when fused), then the encoder's order,
        -- then the id, so every build picks the same passages.
        row_number() over (
            partition by fused.query_id
            order by fused.fused_score desc, fused.rc_tie_rank, fused.knn_rank, fused.passage_id
        ) as fused_rank,
        fused.fused_score,
        fused.ql_rank,
        fused.rc_rank,
        fused.knn_rank,
        fused.bm25_rank,
        -- left join: a score without its neighbor row shows as a null knn_score (schema.yml fails it)
        neighbor_scores.knn_score,
        neighbor_scores.bm25_score,
        fused.ql_sum,
        fused.ql_mean,
        fused.rc_logodds,
        coalesce(fused.passage_id = seeds.seed_id, false) as is_seed
    from fused
    left join neighbor_scores
        on neighbor_scores.query_id = fused.query_id and neighbor_scores.passage_id = fused.passage_id
    left join seeds on seeds.query_id = fused.query_id
)

select * from final
