"""Scores each version of a model against realised outcomes: joins a tie journal with an
outcomes file and prints, per version, the rows joined, the mean absolute error, the RMSE, the
information coefficient (Pearson correlation of the first output with the outcome) and the
rank IC (Spearman), computed with DuckDB and again with polars.

    python journal_outcomes.py JOURNAL_DIR OUTCOMES.csv MODEL [--on request|time]

--on request (the default): OUTCOMES.csv has the columns pid, session_id, request_id, outcome:
the outcome of the request the client process `pid` sent with that id on that session (the
client knows all three: its process id, `Client::session_id()` and the id `submit` returned).
Session ids are unique within one run of the server only, and request ids within a session:
the client's pid tells runs apart. A shadow version's rows carry the primary's ids, so they
are scored on the same outcomes.

--on time: OUTCOMES.csv has the columns time (RFC 3339, UTC), outcome: each prediction gets
the first outcome at or after the time its client sent the request (an as-of join on the
journal's sent_time).

Prints JSON: {"duckdb": [...], "polars": [...]}, one object per version, lowest first.
Needs duckdb and polars (pip install duckdb polars).
"""
import json
import sys

import duckdb
import polars as pl


def sql_string(s):
    return "'" + s.replace("'", "''") + "'"


def with_duckdb(journal, outcomes, model, on):
    predictions = f"""
        select version, pid, session_id, request_id, sent_time::timestamptz as sent_time,
               outputs[1] as prediction
        from read_parquet({sql_string(journal + '/*.parquet')})
        where model = {sql_string(model)} and status = 'Ok'"""
    if on == "request":
        joined = f"""
        select p.version, p.prediction, o.outcome
        from predictions p
        join read_csv({sql_string(outcomes)}, header = true,
                      columns = {{'pid': 'UINTEGER', 'session_id': 'UBIGINT',
                                  'request_id': 'UBIGINT', 'outcome': 'DOUBLE'}}) o
          using (pid, session_id, request_id)"""
    else:
        joined = f"""
        select p.version, p.prediction, o.outcome
        from predictions p
        asof join read_csv({sql_string(outcomes)}, header = true,
                           columns = {{'time': 'TIMESTAMPTZ', 'outcome': 'DOUBLE'}}) o
          on p.sent_time <= o.time"""
    # Spearman's rank IC: Pearson's on average ranks (ties share the mean of their ranks).
    query = f"""
        with predictions as ({predictions}),
        joined as ({joined}),
        ranked as (
            select version, prediction, outcome,
                (rank() over (partition by version order by prediction)
                 + count(*) over (partition by version)
                 - rank() over (partition by version order by prediction desc) + 1) / 2
                    as prediction_rank,
                (rank() over (partition by version order by outcome)
                 + count(*) over (partition by version)
                 - rank() over (partition by version order by outcome desc) + 1) / 2
                    as outcome_rank
            from joined)
        select version, count(*) as rows,
               avg(abs(prediction - outcome)) as mae,
               sqrt(avg((prediction - outcome) * (prediction - outcome))) as rmse,
               corr(prediction, outcome) as ic,
               corr(prediction_rank, outcome_rank) as rank_ic
        from ranked
        group by version
        order by version"""
    cursor = duckdb.connect().execute(query)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def with_polars(journal, outcomes, model, on):
    predictions = (
        pl.scan_parquet(journal + "/*.parquet")
        .filter((pl.col("model") == model) & (pl.col("status") == "Ok"))
        .select(
            "version",
            "pid",
            "session_id",
            "request_id",
            pl.col("sent_time").dt.cast_time_unit("us"),
            pl.col("outputs").list.first().cast(pl.Float64).alias("prediction"),
        )
    )
    if on == "request":
        o = pl.scan_csv(
            outcomes,
            schema={
                "pid": pl.UInt32,
                "session_id": pl.UInt64,
                "request_id": pl.UInt64,
                "outcome": pl.Float64,
            },
        )
        joined = predictions.join(o, on=["pid", "session_id", "request_id"], how="inner")
    else:
        o = pl.scan_csv(outcomes, schema={"time": pl.String, "outcome": pl.Float64}).select(
            pl.col("time").str.to_datetime(time_unit="us", time_zone="UTC"), "outcome"
        )
        joined = predictions.sort("sent_time").join_asof(
            o.sort("time"), left_on="sent_time", right_on="time", strategy="forward"
        ).drop_nulls("outcome")
    scores = (
        joined.group_by("version")
        .agg(
            pl.len().alias("rows"),
            (pl.col("prediction") - pl.col("outcome")).abs().mean().alias("mae"),
            ((pl.col("prediction") - pl.col("outcome")) ** 2).mean().sqrt().alias("rmse"),
            pl.corr("prediction", "outcome").alias("ic"),
            pl.corr("prediction", "outcome", method="spearman").alias("rank_ic"),
        )
        .sort("version")
        .collect()
    )
    return scores.to_dicts()


def main():
    args = sys.argv[1:]
    on = "request"
    if "--on" in args:
        i = args.index("--on")
        on = args[i + 1]
        del args[i : i + 2]
    if len(args) != 3 or on not in ("request", "time"):
        sys.exit(__doc__)
    journal, outcomes, model = args
    print(json.dumps({
        "duckdb": with_duckdb(journal, outcomes, model, on),
        "polars": with_polars(journal, outcomes, model, on),
    }))


if __name__ == "__main__":
    main()
