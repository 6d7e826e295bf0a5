"""Reads a tie journal directory with pandas (pyarrow), polars and DuckDB, as a desk would,
and writes what each saw as JSON.

    python journal_readers.py JOURNAL_DIR OUT.json
"""
import json
import sys

import duckdb
import pandas as pd
import polars as pl

journal, out = sys.argv[1], sys.argv[2]
files = f"{journal}/*.parquet"
seen = {}

df = pd.read_parquet(journal, engine="pyarrow")
ok = df[df.status == "Ok"]
seen["pandas"] = {
    "rows": len(df),
    "ok": len(ok),
    "models": sorted(df.model.unique().tolist()),
    "statuses": sorted(df.status.unique().tolist()),
    "time_tz": str(df.time.dt.tz),
    # Each OK row's first output and first feature, by request id and session.
    "answers": {f"{r.session_id}/{r.request_id}": [float(r.outputs[0]), float(r.features[0])]
                for r in ok.itertuples()},
    "errors_without_outputs": int(df[df.status != "Ok"].outputs.isna().sum()),
}

pf = pl.read_parquet(files)
seen["polars"] = {
    "rows": pf.height,
    "ok": pf.filter(pl.col("status") == "Ok").height,
    "sum_first_output": float(
        pf.filter(pl.col("status") == "Ok").select(pl.col("outputs").list.first().sum()).item()),
}

con = duckdb.connect()
rows, ok, sum_first, latest = con.execute(
    f"""select count(*), count(*) filter (where status = 'Ok'),
               sum(outputs[1]) filter (where status = 'Ok'), max(time)
        from read_parquet('{files}')""").fetchone()
seen["duckdb"] = {"rows": rows, "ok": ok, "sum_first_output": float(sum_first),
                  "latest": str(latest)}

with open(out, "w") as f:
    json.dump(seen, f)
