"""One session across a server restart: predicts, says so (a file), waits for the restart (a
file), and predicts until the client has reconnected. Run by tests/integration/python_client.rs.

usage: reconnect.py ENDPOINT SOCKET_DIR ROW.json STEP_DIR
"""

import json
import pathlib
import sys
import time

import numpy as np

import tie_client

endpoint, socket_dir, row_file, step = sys.argv[1:5]
step = pathlib.Path(step)
row = np.asarray(json.loads(pathlib.Path(row_file).read_text()), np.float32)
client = tie_client.Client(endpoint, "mlp64", socket_dir=socket_dir)
before = client.predict(row)
(step / "connected").write_text("")
while not (step / "restarted").exists():
    time.sleep(0.01)
errors = []
deadline = time.monotonic() + 20
while True:
    try:
        after = client.predict(row)
        break
    except tie_client.TieError as e:
        errors.append(type(e).__name__)
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
print(json.dumps({"same": bool(np.allclose(before, after)), "reconnects": client.reconnects, "errors": errors}))
