//! WebSocket through the proxy with a real client and server (Python `websockets`, installed
//! into the peers venv by `scripts/setup-proxy.sh`): the upgrade request is judged by policy;
//! when allowed, the 101 is passed on and both sides are spliced; when denied, the client's
//! handshake gets 403 and an audit record is written.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Reaped, free_port, start, wait_for_port};

fn python() -> PathBuf {
    let feas = std::env::var_os("FEAS")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("tollgate-peers"));
    let py = feas.join("venv/bin/python");
    let ok = Command::new(&py)
        .args(["-c", "import websockets"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "python `websockets` is missing: run scripts/setup-proxy.sh"
    );
    py
}

const SERVER: &str = r#"
import asyncio, sys, websockets
async def echo(ws):
    async for m in ws:
        await ws.send("echo " + m)
async def main():
    async with websockets.serve(echo, "127.0.0.1", int(sys.argv[1])):
        await asyncio.Future()
asyncio.run(main())
"#;

const CLIENT: &str = r#"
import asyncio, sys, websockets
async def main():
    try:
        async with websockets.connect(sys.argv[1], open_timeout=5) as ws:
            out = []
            for m in ["a", "b"]:
                await ws.send(m)
                out.append(await ws.recv())
            print("|".join(out))
    except websockets.exceptions.InvalidStatus as e:
        print("status", e.response.status_code)
asyncio.run(main())
"#;

const POLICY: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: ws, namespace: prod}\nspec:\n  endpointSelector: {matchLabels: {app: chat}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts:\n    - ports: [{port: \"8765\", protocol: TCP}]\n      rules:\n        http:\n        - {method: GET, path: /ws/public, headers: [\"Upgrade: websocket\"]}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_judged_then_spliced() {
    let py = python();
    let port = free_port();
    let server = Reaped(
        Command::new(&py)
            .args(["-c", SERVER, &port.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_port(port);
    let p = start(
        POLICY,
        "- {name: client, namespace: prod, labels: {app: client}, ips: [127.0.0.1]}\n- {name: chat, namespace: prod, labels: {app: chat}, ips: [127.0.0.70]}\n",
        "chat:8765",
        port,
    )
    .await;
    let addr = p.addr;
    let run = |path: &'static str| {
        let py = py.clone();
        async move {
            let out = tokio::process::Command::new(py)
                .args(["-c", CLIENT, &format!("ws://{addr}{path}")])
                .output()
                .await
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        }
    };
    assert_eq!(
        run("/ws/public").await,
        "echo a|echo b",
        "frames flow both ways after 101"
    );
    assert_eq!(run("/ws/admin").await, "status 403");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let recs = p.records();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["http"]["path"], "/ws/admin");
    drop(server);
}
