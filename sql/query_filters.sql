-- One row per generated query: its measures (seed rank, copy rate, length, duplicate) and the filters that drop it
with

settings as (
    select
        getvariable('select_round_trip_top_k')::bigint as round_trip_top_k,
        getvariable('select_max_copy_rate')::double as max_copy_rate,
        getvariable('select_min_query_words')::bigint as min_query_words,
        getvariable('select_max_query_words')::bigint as max_query_words,
        getvariable('select_drop_duplicate_queries')::boolean as drop_duplicate_queries
),

query_texts as (
    select query_id, passage_id as seed_id, query from queries
),

-- Only the seeds' texts are tokenized, not the whole corpus.
seed_texts as (
    select query_texts.query_id, passages.text as seed_text
    from query_texts
    join passages on passages.passage_id = query_texts.seed_id
),

seed_ranks as (
    select neighbors.query_id, neighbors.knn_rank as seed_knn_rank
    from neighbors
    join query_texts on query_texts.query_id = neighbors.query_id and query_texts.seed_id = neighbors.passage_id
),

words as (
    select
        query_texts.query_id,
        query_texts.seed_id,
        -- Words: lowercased runs of letters and digits in any script, for both copy rate and length.
        regexp_extract_all(lower(query_texts.query), '[\pL\pN]+') as query_words,
        -- The seed's words as one space-padded string: a word occurs in it iff ' word ' does, which is
        -- about twice as fast as a list of the seed's words (passages are long, queries short). Only
        -- what is neither a letter, a digit nor a space becomes a space: the spaces already there are
        -- left alone, so the regex stops at punctuation only, not between every two words (2x faster).
        ' ' || regexp_replace(lower(seed_texts.seed_text), '[^\pL\pN ]+', ' ', 'g') || ' ' as seed_words,
        -- Near-duplicate key: case, punctuation and spacing are not what makes two queries differ.
        trim(regexp_replace(regexp_replace(lower(query_texts.query), '[^\pL\pN\s]', '', 'g'), '\s+', ' ', 'g'))
            as normalized_query
    from query_texts
    left join seed_texts on seed_texts.query_id = query_texts.query_id
),

measures as (
    select
        words.query_id,
        words.seed_id,
        len(words.query_words) as n_words,
        seed_ranks.seed_knn_rank,
        -- Repeats count: "what is the what" copies "what" twice. Null for a query without words.
        len(list_filter(words.query_words, lambda w: contains(words.seed_words, ' ' || w || ' ')))
            / nullif(len(words.query_words), 0) as copy_rate,
        words.normalized_query
    from words
    left join seed_ranks on seed_ranks.query_id = words.query_id
),

flags as (
    select
        measures.*,
        settings.drop_duplicate_queries,
        -- Promptagator's round trip: the seed must come back in the encoder's top k; a seed the
        -- encoder did not mine into the top N is further down, so it fails too.
        settings.round_trip_top_k is not null
            and coalesce(measures.seed_knn_rank > settings.round_trip_top_k, true) as outside_round_trip,
        coalesce(measures.copy_rate > settings.max_copy_rate, false) as above_max_copy_rate,
        coalesce(measures.n_words < settings.min_query_words, false) as below_min_words,
        coalesce(measures.n_words > settings.max_query_words, false) as above_max_words
    from measures
    cross join settings
),

duplicates as (
    select
        flags.*,
        -- The first earlier query with the same text that the other filters keep: a query dropped for
        -- another reason does not count, so every text keeps one query whenever any passes the others.
        min(query_id) filter (
            where not (outside_round_trip or above_max_copy_rate or below_min_words or above_max_words)
        ) over (
            partition by normalized_query order by query_id rows between unbounded preceding and 1 preceding
        ) as duplicate_of
    from flags
),

final as (
    select
        query_id,
        seed_id,
        n_words,
        seed_knn_rank,
        copy_rate,
        normalized_query,
        duplicate_of,
        outside_round_trip,
        above_max_copy_rate,
        below_min_words,
        above_max_words,
        drop_duplicate_queries and duplicate_of is not null as duplicate,
        not (
            outside_round_trip or above_max_copy_rate or below_min_words or above_max_words
            or (drop_duplicate_queries and duplicate_of is not null)
        ) as kept
    from duplicates
)

select * from final
