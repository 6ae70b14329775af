-- Soft labels for distillation: every LLM-scored candidate of each training query, with its teacher score
with

settings as (
    select
        case
            when getvariable('train_distill_score') in ('ql_sum', 'ql_mean', 'fused')
                then getvariable('train_distill_score')
            else error('train_distill_score must be ql_sum, ql_mean or fused, got '
                || coalesce(getvariable('train_distill_score')::varchar, 'NULL'))
        end as distill_score
),

-- Only queries the trainer sees: a query the selection dropped has no example to attach labels to.
-- With train.distill_weight 0 (the default) the trainer never reads this table: it stays empty, which
-- saves a third of the stage's work on a large run (one row per scored pair, with both texts).
training_queries as (
    select distinct query_id from triples
    where getvariable('train_distill_weight') > 0
),

query_texts as (
    select query_id, task, query from queries
),

passage_texts as (
    select passage_id, title, text from passages
),

scored as (
    select
        fused_ranks.query_id,
        fused_ranks.passage_id,
        fused_ranks.fused_rank,
        case settings.distill_score
            when 'ql_sum' then fused_ranks.ql_sum
            when 'ql_mean' then fused_ranks.ql_mean
            -- The fused teacher (every signal select.weights reads): ln R, so that softmax(teacher / T)
            -- is R normalised over the candidates at T = 1. R > 0 for every candidate (fused_ranks fails on a
            -- weighted signal without a rank, and at least one weight is above 0), so the log is defined.
            when 'fused' then ln(fused_ranks.fused_score)
        end as teacher_score
    from fused_ranks
    cross join settings
    where fused_ranks.query_id in (select query_id from training_queries)
),

final as (
    select
        scored.query_id,
        query_texts.task,
        query_texts.query,
        scored.passage_id,
        passage_texts.title,
        passage_texts.text,
        scored.teacher_score,
        scored.fused_rank
    from scored
    left join query_texts on query_texts.query_id = scored.query_id
    left join passage_texts on passage_texts.passage_id = scored.passage_id
    -- A pair the LLM could not score has no soft label; the rest of its query's list still teaches.
    where scored.teacher_score is not null
)

select * from final order by query_id, passage_id
