-- One row of counts that says what the selection did: positives, p1 vs seed, guards, negatives, dropped queries
with

settings as (
    select
        getvariable('select_positive') as positive_strategy,
        getvariable('select_negative') as negative_strategy,
        getvariable('select_num_negatives')::bigint as num_negatives
),

query_counts as (
    select count(*) as queries from queries
),

positive_counts as (
    select
        count(*) as queries_with_positive,
        count(*) filter (where differs_from_seed) as positives_differing_from_seed,
        count(fused_top_id) as queries_with_fused_top,
        count(*) filter (where fused_top_id <> seed_id) as fused_top_differing_from_seed
    from positives
),

candidate_counts as (
    select
        count(*) as candidates,
        count(*) filter (where above_relative_margin) as candidates_above_relative_margin,
        count(*) filter (where rated_relevant) as candidates_rated_relevant,
        count(*) filter (where eligible) as candidates_eligible
    from negative_candidates
),

negative_counts as (
    select
        count(*) as negatives,
        count(distinct query_id) as queries_with_negative
    from hard_negatives
),

triple_counts as (
    select
        count(*) as triples,
        count(distinct query_id) as queries_in_triples,
        count(*) filter (where negative_id is null) as triples_without_negative
    from triples
),

final as (
    select
        settings.positive_strategy,
        settings.negative_strategy,
        settings.num_negatives,
        query_counts.queries,
        positive_counts.queries_with_positive,
        positive_counts.positives_differing_from_seed,
        positive_counts.queries_with_fused_top,
        positive_counts.fused_top_differing_from_seed,
        candidate_counts.candidates,
        candidate_counts.candidates_above_relative_margin,
        candidate_counts.candidates_rated_relevant,
        candidate_counts.candidates_eligible,
        negative_counts.negatives,
        negative_counts.queries_with_negative,
        positive_counts.queries_with_positive - negative_counts.queries_with_negative as queries_without_negative,
        triple_counts.triples,
        triple_counts.triples_without_negative,
        -- Queries with no training example: no positive (no scored neighbors) or no negative when not kept.
        query_counts.queries - triple_counts.queries_in_triples as queries_dropped
    from settings, query_counts, positive_counts, candidate_counts, negative_counts, triple_counts
)

select * from final
