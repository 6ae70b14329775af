-- Gecko's rank fusion per (query, mined passage): R = 1/(k + r_QL) + 1/(k + r_RC), ranked within each query
with

settings as (
    select getvariable('select_rrf_k')::bigint as rrf_k
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
    select query_id, passage_id, knn_score from neighbors
),

seeds as (
    select query_id, passage_id as seed_id from queries
),

fused as (
    select
        scores.query_id,
        scores.passage_id,
        -- R written as one fraction, (2k + a + b) / ((k + a)(k + b)), and divided once: sums that are
        -- equal on paper (1/2 + 1/6 = 1/3 + 1/3) round to the same double, so a tie is a true tie and
        -- goes to the tie-breakers below instead of to floating-point noise.
        (2 * settings.rrf_k + scores.ql_rank + scores.rc_rank)
            / ((settings.rrf_k + scores.ql_rank) * (settings.rrf_k + scores.rc_rank)) as fused_score,
        scores.ql_rank,
        scores.rc_rank,
        scores.knn_rank,
        -- left join: a score without its neighbor row shows as a null knn_score (schema.yml fails it)
        neighbor_scores.knn_score,
        scores.ql_sum,
        scores.ql_mean,
        scores.rc_logodds,
        coalesce(scores.passage_id = seeds.seed_id, false) as is_seed
    from scores
    cross join settings
    left join neighbor_scores
        on neighbor_scores.query_id = scores.query_id and neighbor_scores.passage_id = scores.passage_id
    left join seeds on seeds.query_id = scores.query_id
),

final as (
    select
        query_id,
        passage_id,
        -- Ties: the LLM's direct relevance judgement first, then the encoder's order, then the id,
        -- so every build picks the same passages.
        row_number() over (
            partition by query_id order by fused_score desc, rc_rank, knn_rank, passage_id
        ) as fused_rank,
        fused_score,
        ql_rank,
        rc_rank,
        knn_rank,
        knn_score,
        ql_sum,
        ql_mean,
        rc_logodds,
        is_seed
    from fused
)

select * from final
