-- Every mined passage that could be a query's hard negative, flagged by the two false-negative guards
with

settings as (
    select
        getvariable('select_relative_margin')::double as relative_margin,
        getvariable('select_max_negative_rc_logodds')::double as max_negative_rc_logodds
),

fused as (
    select * from fused_ranks
),

positive_scores as (
    select query_id, positive_id, seed_id, knn_score as positive_knn_score from positives
),

candidates as (
    select
        fused.query_id,
        fused.passage_id,
        fused.fused_rank,
        fused.knn_score,
        fused.rc_logodds,
        positive_scores.positive_knn_score,
        -- NV-Retriever's TopK-PercPos with sentence-transformers' meaning of relative_margin: a negative
        -- may be at most (1 - relative_margin) as similar to the query as the positive. It needs the
        -- positive's encoder score, unknown for a seed positive outside the mined top N: then it is off.
        coalesce(
            fused.knn_score > positive_scores.positive_knn_score * (1 - settings.relative_margin), false
        ) as above_relative_margin,
        -- The LLM itself says relevant: likely an unlabelled positive, the worst thing to push away.
        -- Without RC scores (score.methods) the guard would silently pass everything: fail instead.
        case
            when settings.max_negative_rc_logodds is null then false
            when fused.rc_logodds is null then error('select.max_negative_rc_logodds is set but llm_scores has no '
                || 'rc_logodds for query ' || fused.query_id || ', passage ' || fused.passage_id
                || ': score RC (score.methods) or set select.max_negative_rc_logodds to null')
            else fused.rc_logodds > settings.max_negative_rc_logodds
        end as rated_relevant
    from fused
    join positive_scores on positive_scores.query_id = fused.query_id
    cross join settings
    -- Never the positive; never the seed either: when p1 differs from it, the seed (the passage the
    -- query was written from) is most likely a second true positive.
    where fused.passage_id <> positive_scores.positive_id
      and fused.passage_id is distinct from positive_scores.seed_id
),

final as (
    -- Keys, the scores the guards read, and the verdicts; the other ranks stay in fused_ranks
    -- (a million-row stage would otherwise write them twice).
    select
        query_id,
        passage_id,
        fused_rank,
        knn_score,
        positive_knn_score,
        rc_logodds,
        above_relative_margin,
        rated_relevant,
        not above_relative_margin and not rated_relevant as eligible
    from candidates
)

select * from final
