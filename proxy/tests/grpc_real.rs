//! gRPC through the proxy with a real grpcio server and client (Python, from
//! `../shared/peers`: `install-py.sh` makes the venv and stubs, run by `scripts/setup-proxy.sh`).
//! Unary and server-streaming calls pass through; a call no rule allows gets a trailers-only
//! PERMISSION_DENIED the client sees as status code 7, and an audit record names the call.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Reaped, free_port, start, wait_for_port};

fn peers() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/peers")
}

fn feas() -> PathBuf {
    std::env::var_os("FEAS")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("tollgate-peers"))
}

fn python() -> PathBuf {
    let py = feas().join("venv/bin/python");
    assert!(
        py.exists() && feas().join("grpc/helloworld_pb2_grpc.py").exists(),
        "the grpcio venv is missing: run scripts/setup-proxy.sh (it runs ../shared/peers/install-py.sh)"
    );
    py
}

fn start_server() -> (Reaped, u16) {
    let port = free_port();
    let child = Command::new(python())
        .arg(peers().join("grpc/server.py"))
        .arg(port.to_string())
        .env("FEAS", feas())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the grpc server");
    let server = Reaped(child);
    wait_for_port(port);
    (server, port)
}

const CLIENT: &str = r#"
import json, os, sys
sys.path.insert(0, os.path.join(os.environ["FEAS"], "grpc"))
import grpc, helloworld_pb2 as pb, helloworld_pb2_grpc as pbg
stub = pbg.GreeterStub(grpc.insecure_channel(sys.argv[1]))
out = {}
try:
    out["unary"] = stub.SayHello(pb.HelloRequest(name="t"), timeout=5).message
except grpc.RpcError as e:
    out["unary"] = "code=%d" % e.code().value[0]
try:
    out["stream"] = len(list(stub.SayHelloStream(pb.HelloRequest(name="s"), timeout=5)))
except grpc.RpcError as e:
    out["stream"] = "code=%d" % e.code().value[0]
print(json.dumps(out))
"#;

fn policy(methods: &[&str]) -> String {
    let rules: String = methods
        .iter()
        .map(|m| format!("        - {{service: helloworld.Greeter, method: {m}}}\n"))
        .collect();
    format!(
        "apiVersion: tollgate.io/v1alpha1\nkind: TollgatePolicy\nmetadata: {{name: greeter, namespace: prod}}\nspec:\n  endpointSelector: {{matchLabels: {{app: greeter}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: grpc-client}}}}]\n    toPorts:\n    - ports: [{{port: \"50051\", protocol: TCP}}]\n      rules:\n        grpc:\n{rules}"
    )
}

async fn run_case(methods: &[&str]) -> (serde_json::Value, Vec<serde_json::Value>) {
    let py = python();
    let (_server, port) = start_server();
    let p = start(
        &policy(methods),
        "- {name: grpc-client, namespace: prod, labels: {app: grpc-client}, ips: [127.0.0.1]}\n- {name: greeter, namespace: prod, labels: {app: greeter}, ips: [127.0.0.60]}\n",
        "greeter:50051",
        port,
    )
    .await;
    let addr = p.addr;
    let out = tokio::process::Command::new(py)
        .args(["-c", CLIENT, &addr.to_string()])
        .env("FEAS", feas())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "client output: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let records = p.records();
    (result, records)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_and_streaming_calls_pass_through_when_allowed() {
    let (result, records) = run_case(&["SayHello", "SayHelloStream"]).await;
    assert_eq!(result["unary"], "hello t");
    assert_eq!(result["stream"], 10, "all ten streamed replies arrive");
    assert!(records.is_empty(), "{records:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_call_gets_permission_denied_and_an_audit_record() {
    let (result, records) = run_case(&["SayHello"]).await;
    assert_eq!(result["unary"], "hello t");
    assert_eq!(
        result["stream"], "code=7",
        "PERMISSION_DENIED, not a bare 403"
    );
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["protocol"], "grpc");
    assert_eq!(records[0]["grpc"]["service"], "helloworld.Greeter");
    assert_eq!(records[0]["grpc"]["method"], "SayHelloStream");
    assert_eq!(records[0]["reason"], "l7-no-match");
}
