-- Each query's hard negatives, picked from the eligible candidates by select.negative (lowest | random | range)
with

settings as (
    select
        case
            when getvariable('select_negative') in ('lowest', 'random', 'range') then getvariable('select_negative')
            else error('select_negative must be lowest, random or range, got '
                || coalesce(getvariable('select_negative')::varchar, 'NULL'))
        end as strategy,
        getvariable('select_num_negatives')::bigint as num_negatives,
        getvariable('select_range_min')::bigint as range_min,
        getvariable('select_range_max')::bigint as range_max,
        getvariable('base_seed')::varchar as seed
),

eligible as (
    select * from negative_candidates where eligible
),

in_scope as (
    select eligible.*, settings.strategy, settings.num_negatives, settings.seed
    from eligible
    cross join settings
    -- sentence-transformers' window: skip the range_min best fused ranks, look no deeper than range_max
    where settings.strategy <> 'range'
       or (eligible.fused_rank > settings.range_min
           and (settings.range_max is null or eligible.fused_rank <= settings.range_max))
),

picked as (
    select
        *,
        row_number() over (
            partition by query_id
            order by
                -- lowest: Gecko's p_N, the bottom of the fused ranking
                case when strategy = 'lowest' then -fused_rank end,
                -- random: a draw fixed by base.seed; md5 (unlike hash()) is the same in every DuckDB version
                case when strategy = 'random' then md5_number(concat_ws('|', seed, query_id, passage_id)) end,
                -- range: the hardest candidates left inside the window
                case when strategy = 'range' then fused_rank end,
                passage_id
        ) as negative_rank
    from in_scope
),

chosen as (
    select query_id, passage_id, negative_rank, strategy from picked where negative_rank <= num_negatives
),

final as (
    select
        chosen.query_id,
        chosen.passage_id as negative_id,
        chosen.negative_rank,
        chosen.strategy,
        fused.fused_rank,
        fused.fused_score,
        fused.ql_rank,
        fused.rc_rank,
        fused.knn_rank,
        fused.knn_score,
        fused.rc_logodds
    from chosen
    join fused_ranks as fused on fused.query_id = chosen.query_id and fused.passage_id = chosen.passage_id
)

select * from final
