-- Training examples for the trainer: one row per (query, hard negative), with texts and selection lineage
with

settings as (
    select getvariable('select_keep_without_negative')::boolean as keep_without_negative
),

query_texts as (
    select query_id, task_type, task, query from queries
),

passage_texts as (
    select passage_id, title, text from passages
),

examples as (
    select
        positives.*,
        hard_negatives.negative_id,
        hard_negatives.negative_rank,
        hard_negatives.strategy,
        hard_negatives.fused_rank as negative_fused_rank,
        hard_negatives.fused_score as negative_fused_score,
        hard_negatives.ql_rank as negative_ql_rank,
        hard_negatives.rc_rank as negative_rc_rank,
        hard_negatives.knn_rank as negative_knn_rank,
        hard_negatives.knn_score as negative_knn_score,
        hard_negatives.rc_logodds as negative_rc_logodds
    from positives
    cross join settings
    left join hard_negatives on hard_negatives.query_id = positives.query_id
    -- Without a hard negative a query still trains against in-batch negatives, if kept.
    where hard_negatives.negative_id is not null or settings.keep_without_negative
),

final as (
    select
        examples.query_id,
        query_texts.task_type,
        query_texts.task,
        query_texts.query,
        examples.positive_id,
        positive.title as positive_title,
        positive.text as positive_text,
        examples.negative_id,
        negative.title as negative_title,
        negative.text as negative_text,
        examples.negative_rank,
        examples.strategy,
        examples.seed_id,
        examples.differs_from_seed,
        examples.fused_rank as positive_fused_rank,
        examples.fused_score as positive_fused_score,
        examples.ql_rank as positive_ql_rank,
        examples.rc_rank as positive_rc_rank,
        examples.knn_rank as positive_knn_rank,
        examples.knn_score as positive_knn_score,
        examples.rc_logodds as positive_rc_logodds,
        examples.negative_fused_rank,
        examples.negative_fused_score,
        examples.negative_ql_rank,
        examples.negative_rc_rank,
        examples.negative_knn_rank,
        examples.negative_knn_score,
        examples.negative_rc_logodds
    from examples
    left join query_texts on query_texts.query_id = examples.query_id
    left join passage_texts as positive on positive.passage_id = examples.positive_id
    left join passage_texts as negative on negative.passage_id = examples.negative_id
)

-- Sorted so the file's row order is the same in every build (the trainer shuffles with its own seed).
select * from final order by query_id, negative_rank
