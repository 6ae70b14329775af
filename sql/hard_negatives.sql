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

-- Each query's first num_negatives candidates in the strategy's order: one bounded top-n per query
-- (min_by with n), not a window numbering every candidate, whose per-query sort on a key ending in the
-- passage id string took most of this model's time (bench/triples.py, 936k candidates: 0.19 -> 0.10 s
-- in the build, same rows). The key is a struct, compared field by field: the strategy's order, then
-- the passage id for ties. One field type serves all three orders: lowest counts down from 2^62 (far
-- above any fused rank), random is md5's 128-bit number, range the fused rank itself.
picked as (
    select
        query_id,
        min_by(
            passage_id,
            {
                strategy_key: case strategy
                    when 'lowest' then (4611686018427387904 - fused_rank)::uhugeint
                    when 'random' then md5_number(concat_ws('|', seed, query_id, passage_id))
                    else fused_rank::uhugeint
                end,
                passage_id: passage_id
            },
            num_negatives
        ) as picks
    from in_scope
    group by query_id
),

chosen as (
    select
        picked.query_id,
        unnest(picked.picks) as passage_id,
        unnest(range(1, len(picked.picks) + 1)) as negative_rank,
        settings.strategy
    from picked
    cross join settings
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
