"""Screenshot a page with headless Chromium over the DevTools protocol, after a real wait (MLflow's UI
loads charts with XHRs that --virtual-time-budget does not wait for). Usage: cdp_shot.py OUT URL [WAIT] [W H]"""

import base64
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import websocket

out, url = sys.argv[1], sys.argv[2]
wait = float(sys.argv[3]) if len(sys.argv) > 3 else 12
w, h = (int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else (1500, 950)
proc = subprocess.Popen(
    [
        "chromium",
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--remote-debugging-port=9339",
        "--remote-allow-origins=http://127.0.0.1:9339",
        f"--window-size={w},{h}",
        "about:blank",
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
try:
    for _ in range(50):
        try:
            tabs = json.load(urllib.request.urlopen("http://127.0.0.1:9339/json"))
            page = next(t for t in tabs if t["type"] == "page")
            break
        except Exception:
            time.sleep(0.2)
    ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
    n = 0

    def call(method, **params):
        global n
        n += 1
        ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            msg = json.loads(ws.recv())
            if msg.get("id") == n:
                return msg.get("result", {})

    call("Emulation.setDeviceMetricsOverride", width=w, height=h, deviceScaleFactor=1, mobile=False)
    call("Page.navigate", url=url)
    time.sleep(wait)
    data = call("Page.captureScreenshot", format="png")["data"]
    Path(out).write_bytes(base64.b64decode(data))
    print(out)
finally:
    proc.kill()
