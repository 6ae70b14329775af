-- One positive passage per query: the top of the fused ranking (Gecko's p1) or the seed passage (select.positive)
with

settings as (
    select getvariable('select_positive') as positive_strategy
),

-- Only the queries the filters keep (all of them with the filters off) get a positive.
seeds as (
    select query_id, seed_id from query_filters where kept
),

-- The only rows of fused_ranks a positive can come from: each query's p1 and its seed. Filtered once
-- here, so the joins below probe about two rows per query instead of the whole top N.
fused as (
    select * from fused_ranks where fused_rank = 1 or is_seed
),

fused_top as (
    select query_id, passage_id as fused_top_id from fused where fused_rank = 1
),

seed_ranks as (
    select query_id, fused_rank as seed_fused_rank from fused where is_seed
),

chosen as (
    select
        seeds.query_id,
        seeds.seed_id,
        fused_top.fused_top_id,
        case settings.positive_strategy
            when 'fused' then fused_top.fused_top_id
            when 'seed' then seeds.seed_id
            else error('select_positive must be fused or seed, got ' || coalesce(settings.positive_strategy, 'NULL'))
        end as positive_id
    from seeds
    cross join settings
    left join fused_top on fused_top.query_id = seeds.query_id
),

final as (
    select
        chosen.query_id,
        chosen.positive_id,
        chosen.seed_id,
        chosen.positive_id <> chosen.seed_id as differs_from_seed,
        -- p1 whichever positive was chosen, so "how often does p1 differ from the seed" works in both modes
        chosen.fused_top_id,
        seed_ranks.seed_fused_rank,
        -- The positive's own ranks; null when it is a seed the encoder did not mine into the top N.
        fused.fused_rank,
        fused.fused_score,
        fused.ql_rank,
        fused.rc_rank,
        fused.knn_rank,
        fused.knn_score,
        fused.rc_logodds
    from chosen
    left join fused on fused.query_id = chosen.query_id and fused.passage_id = chosen.positive_id
    left join seed_ranks on seed_ranks.query_id = chosen.query_id
    -- With `fused`, a query that has no scored neighbors has no p1 and so no training example.
    where chosen.positive_id is not null
)

select * from final
