-- One row of counts that says what the selection did: filters, positives, p1 vs seed, guards, negatives, drops
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

-- fused_ranks starts from llm_scores: a mined neighbor without a score row is left out of every later model.
-- Counted as a difference, not a million-row anti join: fused_ranks holds one row per score, each joined
-- to exactly one neighbor row (its data tests fail the build otherwise: one row per (query, passage) and
-- a knn_score on every row), so the neighbors left unscored are all the others.
unscored_counts as (
    select (select count(*) from neighbors) - (select count(*) from fused_ranks) as neighbors_unscored
),

-- A query failing several filters counts under each; queries_filtered counts it once.
filter_counts as (
    select
        count(*) filter (where outside_round_trip) as queries_outside_round_trip,
        count(*) filter (where above_max_copy_rate) as queries_above_max_copy_rate,
        count(*) filter (where below_min_words) as queries_below_min_words,
        count(*) filter (where above_max_words) as queries_above_max_words,
        count(*) filter (where duplicate) as queries_duplicate,
        count(*) filter (where not kept) as queries_filtered
    from query_filters
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

-- Per query, to see how often the guards leave a query without any negative, and whether relative_margin alone does.
query_guards as (
    select
        query_id,
        bool_or(not eligible) as any_guarded,
        bool_or(eligible) as any_eligible,
        bool_and(above_relative_margin) as all_above_relative_margin
    from negative_candidates
    group by query_id
),

guard_counts as (
    select
        count(*) as queries_with_candidates,
        count(*) filter (where any_guarded) as queries_with_guarded_candidate,
        count(*) filter (where not any_eligible) as queries_without_eligible_candidate,
        count(*) filter (where all_above_relative_margin) as queries_all_above_relative_margin
    from query_guards
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
        filter_counts.queries_outside_round_trip,
        filter_counts.queries_above_max_copy_rate,
        filter_counts.queries_below_min_words,
        filter_counts.queries_above_max_words,
        filter_counts.queries_duplicate,
        filter_counts.queries_filtered,
        positive_counts.queries_with_positive,
        -- Kept by the filters, but no positive: with `fused`, no scored neighbor, so no p1.
        query_counts.queries - filter_counts.queries_filtered - positive_counts.queries_with_positive
            as queries_without_positive,
        unscored_counts.neighbors_unscored,
        positive_counts.positives_differing_from_seed,
        positive_counts.queries_with_fused_top,
        positive_counts.fused_top_differing_from_seed,
        candidate_counts.candidates,
        candidate_counts.candidates_above_relative_margin,
        candidate_counts.candidates_rated_relevant,
        candidate_counts.candidates_eligible,
        guard_counts.queries_with_candidates,
        guard_counts.queries_with_guarded_candidate,
        guard_counts.queries_without_eligible_candidate,
        guard_counts.queries_all_above_relative_margin,
        negative_counts.negatives,
        negative_counts.queries_with_negative,
        positive_counts.queries_with_positive - negative_counts.queries_with_negative as queries_without_negative,
        triple_counts.triples,
        triple_counts.triples_without_negative,
        -- Queries with no training example: filtered, no positive (no scored neighbors), or no negative when not kept.
        query_counts.queries - triple_counts.queries_in_triples as queries_dropped
    from settings, query_counts, unscored_counts, filter_counts, positive_counts, candidate_counts, guard_counts,
        negative_counts, triple_counts
)

select * from final
