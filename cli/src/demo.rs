//! `tollgate demo` (root): sidecarless enforcement for real, in a few seconds, then cleaned up.
//!
//! Each "pod" is a network namespace with a veth into a node namespace (names carry this
//! process's id, so two demos do not collide). In the node namespace, `tollgate up
//! --external-proxy --rule-socket SOCK` (datapath + agent) and a separate `tollgate proxy --agent
//! SOCK` (this same binary) enforce the API-gateway example of conformance/policies (HTTP and
//! gRPC), a DNS egress policy and Kafka rules. Real servers run in the pods (python3 http.server,
//! a grpcio greeter, dnsmasq, a tansu broker when installed) and real clients (curl, grpcio, dig,
//! kcat) send allowed and denied requests. Each request is printed with what the policy says and
//! what the client saw; then the audit records from the proxy's Observe stream. Everything is
//! removed at the end, on error and on Ctrl-C. Exit status 1 when any outcome differs from the
//! policy, so the demo is also a check.

use std::fmt;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// After the requests, keep the pods and tollgate running until Enter or Ctrl-C, to send
    /// requests of your own (`ip netns exec NS curl ...`); everything is removed then.
    #[arg(long)]
    pub keep: bool,
    /// Leave out the Kafka part (the tansu broker and kcat).
    #[arg(long)]
    pub skip_kafka: bool,
}

const GATEWAY: &str = include_str!("../../conformance/policies/gateway/policies.yaml");

const DNS_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: frontend-egress, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  egress:
  - toEndpoints: [{matchLabels: {app: api-server}}]
  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.example.com"}]
"#;

const KAFKA_POLICY: &str = r#"apiVersion: tollgate.io/v1alpha1
kind: TollgatePolicy
metadata: {name: orders-kafka, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: kafka}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: billing}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules:
        kafka:
        - {role: produce, topic: "orders-*"}
        - {role: consume, topic: "orders-*", groupID: "billing-*"}
        # Fetch and ListOffsets name no consumer group, so the groupID rule cannot cover them.
        - {apiKey: fetch, topic: "orders-*"}
        - {apiKey: listoffsets, topic: "orders-*"}
        - {topic: orders-secret, action: deny}
"#;

/// The grpcio greeter: `server.py ADDR` (the stubs come from `$FEAS/grpc`).
const GREETER: &str = r#"
import os, sys
from concurrent import futures
sys.path.insert(0, os.path.join(os.environ["FEAS"], "grpc"))
import grpc, helloworld_pb2 as pb, helloworld_pb2_grpc as pbg
class Greeter(pbg.GreeterServicer):
    def SayHello(self, req, ctx):
        return pb.HelloReply(message="hello " + req.name)
s = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
pbg.add_GreeterServicer_to_server(Greeter(), s)
s.add_insecure_port(sys.argv[1])
s.start(); s.wait_for_termination()
"#;

/// One grpcio call: `client.py ADDR /service/Method`; prints `OK <message>` or the status.
const GRPC_CLIENT: &str = r#"
import os, sys
sys.path.insert(0, os.path.join(os.environ["FEAS"], "grpc"))
import grpc, helloworld_pb2 as pb
ch = grpc.insecure_channel(sys.argv[1])
call = ch.unary_unary(sys.argv[2], request_serializer=pb.HelloRequest.SerializeToString,
                      response_deserializer=pb.HelloReply.FromString)
try:
    print("OK " + call(pb.HelloRequest(name="demo"), timeout=3).message)
except grpc.RpcError as e:
    print("%s %s" % (e.code().name, e.details()))
"#;

/// Creates the demo's topics inside the kafka pod, straight at the broker.
const KAFKA_TOPICS: &str = r#"
import sys
from confluent_kafka.admin import AdminClient, NewTopic
a = AdminClient({"bootstrap.servers": sys.argv[1]})
fs = a.create_topics([NewTopic(t, num_partitions=1, replication_factor=1)
                      for t in ("orders-eu", "orders-secret", "payments")], request_timeout=10)
for t, f in fs.items():
    f.result(15)
"#;

struct Pod {
    name: &'static str,
    namespace: &'static str,
    labels: &'static str,
}

const PODS: &[Pod] = &[
    Pod {
        name: "frontend",
        namespace: "prod",
        labels: "{app: frontend}",
    },
    Pod {
        name: "api-server",
        namespace: "prod",
        labels: "{app: api-server}",
    },
    Pod {
        name: "admin",
        namespace: "prod",
        labels: "{app: admin, role: ops}",
    },
    Pod {
        name: "unauthorized",
        namespace: "prod",
        labels: "{app: intruder}",
    },
    Pod {
        name: "resolver",
        namespace: "kube-system",
        labels: "{k8s-app: kube-dns}",
    },
    Pod {
        name: "kafka",
        namespace: "prod",
        labels: "{app: kafka}",
    },
    Pod {
        name: "billing",
        namespace: "prod",
        labels: "{app: billing}",
    },
    Pod {
        name: "grpc-client",
        namespace: "prod",
        labels: "{app: grpc-client}",
    },
    Pod {
        name: "greeter",
        namespace: "prod",
        labels: "{app: greeter}",
    },
];

/// The address of pod `name` (the n-th pod has 10.210.n.2; its node side 10.210.n.1).
fn pod_ip(name: &str) -> String {
    let i = PODS
        .iter()
        .position(|p| p.name == name)
        .expect("a demo pod")
        + 1;
    format!("10.210.{i}.2")
}

/// Everything the demo made, removed once (on return, error, panic or a signal).
#[derive(Default)]
struct Made {
    children: Vec<(String, Child)>,
    netns: Vec<String>,
    pin_root: Option<PathBuf>,
    work: Option<PathBuf>,
    done: bool,
}

impl Made {
    fn cleanup(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        for (_, c) in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.netns.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        if let Some(p) = &self.pin_root {
            let _ = std::fs::remove_dir_all(p);
        }
        if let Some(w) = &self.work {
            let _ = std::fs::remove_dir_all(w);
        }
    }
}

#[derive(Clone, Default)]
struct Guard(Arc<Mutex<Made>>);

impl Guard {
    fn lock(&self) -> MutexGuard<'_, Made> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts `cmd` (stdout and stderr to `log`, or nowhere); it is killed at cleanup.
    fn spawn(&self, what: &str, mut cmd: Command, log: Option<&Path>) -> Result<()> {
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        match log {
            Some(l) => {
                let f = std::fs::File::create(l)?;
                cmd.stdout(f.try_clone()?).stderr(f);
            }
            None => {
                cmd.stderr(Stdio::null());
            }
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        let mut made = self.lock();
        if made.done {
            let _ = child.kill();
            let _ = child.wait();
            bail!("interrupted");
        }
        made.children.push((what.to_string(), child));
        Ok(())
    }

    /// Fails with `log`'s tail when the child started as `what` has exited.
    fn check_alive(&self, what: &str, log: &Path) -> Result<()> {
        let mut made = self.lock();
        if let Some((_, c)) = made.children.iter_mut().find(|(w, _)| w == what)
            && let Ok(Some(status)) = c.try_wait()
        {
            bail!("{what} exited ({status}):\n{}", tail(log, 2000));
        }
        Ok(())
    }
}

fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let start = s.len().saturating_sub(n);
    let start = (start..=s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(0);
    s[start..].to_string()
}

/// Runs a command to completion; fails with its stderr.
fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `ip netns exec NS PROGRAM`.
fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

/// stdout and stderr of `cmd` together, and whether it exited 0.
fn output(mut cmd: Command) -> (String, bool) {
    match cmd.stdin(Stdio::null()).output() {
        Ok(o) => {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            (s, o.status.success())
        }
        Err(e) => (format!("cannot run: {e}"), false),
    }
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{what}: not ready after {timeout:?}")
}

fn tcp_open(ns: &str, ip: &str, port: u16) -> bool {
    let mut c = in_ns(ns, "timeout");
    c.args(["1", "bash", "-c", &format!("exec 3<>/dev/tcp/{ip}/{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c.status().map(|s| s.success()).unwrap_or(false)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// What a request should get, or got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Reached the server and was answered by it.
    Allowed,
    /// Judged by the proxy and refused (403, PERMISSION_DENIED, REFUSED, an authorization
    /// error code).
    Denied,
    /// Dropped in the kernel: no connection, no answer.
    Dropped,
    /// Neither: something else went wrong.
    Failed,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::Dropped => "dropped",
            Verdict::Failed => "FAILED",
        })
    }
}

struct Table {
    rows: usize,
    wrong: Vec<String>,
}

impl Table {
    fn header(title: &str) {
        println!("\n\x1b[1m{title}\x1b[0m");
        println!(
            "  {:<13} {:<6} {:<44} {:<8} {:<8} client saw",
            "from", "proto", "request", "policy", "outcome"
        );
    }

    fn row(
        &mut self,
        from: &str,
        proto: &str,
        request: &str,
        want: Verdict,
        got: (Verdict, String),
    ) {
        self.rows += 1;
        let (outcome, seen) = got;
        let mark = if outcome == want { " " } else { "!" };
        println!(
            "{mark} {from:<13} {proto:<6} {request:<44} {want:<8} {outcome:<8} {}",
            seen.trim()
        );
        if outcome != want {
            self.wrong.push(format!(
                "{from} {proto} {request}: the policy says {want}, it was {outcome} ({})",
                seen.trim()
            ));
        }
    }
}

struct Demo {
    id: u32,
    node: String,
    work: PathBuf,
    guard: Guard,
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.guard.lock().cleanup();
    }
}

impl Demo {
    fn ns(&self, pod: &str) -> String {
        format!("tgd{}-{pod}", self.id)
    }

    fn setup_pods(&self) -> Result<String> {
        let node = &self.node;
        sh(&["ip", "netns", "add", node])?;
        self.guard.lock().netns.push(node.clone());
        sh(&[
            "ip",
            "netns",
            "exec",
            node,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])?;
        sh(&["ip", "-n", node, "link", "set", "lo", "up"])?;
        let mut inventory = String::from("endpoints:\n");
        for (i, p) in PODS.iter().enumerate() {
            let i = i + 1;
            let ns = self.ns(p.name);
            let ifn = format!("tgd{}p{i}", self.id);
            sh(&["ip", "netns", "add", &ns])?;
            self.guard.lock().netns.push(ns.clone());
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            sh(&[
                "ip", "-n", node, "link", "add", &ifn, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            sh(&[
                "ip",
                "-n",
                node,
                "addr",
                "add",
                &format!("10.210.{i}.1/24"),
                "dev",
                &ifn,
            ])?;
            sh(&["ip", "-n", node, "link", "set", &ifn, "up"])?;
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.210.{i}.2/24"),
                "dev",
                "eth0",
            ])?;
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            sh(&[
                "ip",
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.210.{i}.1"),
            ])?;
            inventory.push_str(&format!(
                "  - {{name: {}, namespace: {}, labels: {}, ips: [10.210.{i}.2], interface: {ifn}}}\n",
                p.name, p.namespace, p.labels
            ));
        }
        std::fs::write(self.work.join("endpoints.yaml"), &inventory)?;
        Ok(inventory)
    }

    fn start_api_server(&self) -> Result<()> {
        let www = self.work.join("www");
        for (path, text) in [
            ("public/index.html", "hello\n"),
            ("api/v1/users/7", "{\"id\":7}\n"),
            ("admin/users", "alice,bob\n"),
            ("admin/debug/pprof", "goroutines...\n"),
        ] {
            let f = www.join(path);
            std::fs::create_dir_all(f.parent().expect("a parent"))?;
            std::fs::write(f, text)?;
        }
        let ns = self.ns("api-server");
        let ip = pod_ip("api-server");
        let mut c = in_ns(&ns, "python3");
        c.args(["-m", "http.server", "8080", "--bind", &ip, "--directory"])
            .arg(&www);
        self.guard
            .spawn("api-server (python3 http.server)", c, None)?;
        wait_until("the api-server", Duration::from_secs(10), || {
            Ok(tcp_open(&ns, &ip, 8080))
        })
    }

    fn start_resolver(&self) -> Result<()> {
        let ns = self.ns("resolver");
        let ip = pod_ip("resolver");
        let mut c = in_ns(&ns, "dnsmasq");
        c.args(["--keep-in-foreground", "-C", "/dev/null", "--port=53"])
            .arg(format!("--listen-address={ip}"))
            .args([
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--user=root",
            ])
            .args(["--pid-file=", "--host-record=api.example.com,192.0.2.10"])
            .arg("--host-record=evil.example.org,192.0.2.66");
        let log = self.work.join("dnsmasq.log");
        self.guard.spawn("resolver (dnsmasq)", c, Some(&log))?;
        wait_until("the resolver", Duration::from_secs(10), || {
            self.guard.check_alive("resolver (dnsmasq)", &log)?;
            let mut d = in_ns(&ns, "dig");
            d.args([
                "+tries=1",
                "+time=1",
                "+short",
                &format!("@{ip}"),
                "api.example.com",
            ]);
            Ok(output(d).0.contains("192.0.2.10"))
        })
    }

    fn start_greeter(&self, py: &Path, feas: &Path) -> Result<()> {
        let ns = self.ns("greeter");
        let ip = pod_ip("greeter");
        let mut c = in_ns(&ns, py);
        c.args(["-c", GREETER, &format!("{ip}:50051")])
            .env("FEAS", feas);
        let log = self.work.join("greeter.log");
        self.guard.spawn("greeter (grpcio)", c, Some(&log))?;
        wait_until("the greeter", Duration::from_secs(15), || {
            self.guard.check_alive("greeter (grpcio)", &log)?;
            Ok(tcp_open(&ns, &ip, 50051))
        })
    }

    fn start_kafka(&self, k: &Kafka) -> Result<()> {
        let ns = self.ns("kafka");
        let ip = pod_ip("kafka");
        let url = format!("tcp://{ip}:9092");
        let mut c = in_ns(&ns, "env");
        c.arg("RUST_LOG=warn")
            .arg(&k.tansu)
            .args(["broker", "--cluster-id", "demo", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"]);
        let log = self.work.join("tansu.log");
        self.guard.spawn("kafka (tansu)", c, Some(&log))?;
        wait_until("the kafka broker", Duration::from_secs(15), || {
            self.guard.check_alive("kafka (tansu)", &log)?;
            Ok(tcp_open(&ns, &ip, 9092))
        })?;
        let mut c = in_ns(&ns, "timeout");
        c.arg("30")
            .arg(&k.py)
            .args(["-c", KAFKA_TOPICS, &format!("{ip}:9092")]);
        let (out, ok) = output(c);
        if !ok {
            bail!(
                "the broker did not create its topics: {}\n{}",
                out.trim(),
                tail(&log, 300)
            );
        }
        println!("kafka pod: tansu on {ip}:9092, topics orders-eu, orders-secret, payments");
        Ok(())
    }

    fn write_policies(&self) -> Result<PathBuf> {
        let dir = self.work.join("policies");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("gateway.yaml"), GATEWAY)?;
        std::fs::write(dir.join("dns.yaml"), DNS_POLICY)?;
        std::fs::write(dir.join("kafka.yaml"), KAFKA_POLICY)?;
        Ok(dir)
    }

    fn start_tollgate(&self, exe: &Path, policies: &Path, pin_root: &Path) -> Result<PathBuf> {
        let w = &self.work;
        let netns = format!("--net=/run/netns/{}", self.node);
        let rules = w.join("rules.sock");
        let observe = w.join("observe.sock");
        let up_log = w.join("up.log");
        println!(
            "\n\x1b[1m$ tollgate up --policies policies/ --endpoints endpoints.yaml --external-proxy \
             --rule-socket rules.sock   (in the node namespace: datapath + agent)\x1b[0m"
        );
        // nsenter switches only the network namespace (`ip netns exec` would also remount
        // /sys, hiding the BPF filesystem the datapath pins to).
        let mut up = Command::new("nsenter");
        up.arg(&netns)
            .arg(exe)
            .arg("up")
            .arg("--policies")
            .arg(policies)
            .arg("--endpoints")
            .arg(w.join("endpoints.yaml"))
            .arg("--pin-root")
            .arg(pin_root)
            .arg("--audit-log")
            .arg(w.join("agent-audit.jsonl"))
            .arg("--external-proxy")
            .arg("--rule-socket")
            .arg(&rules);
        self.guard.spawn("tollgate up", up, Some(&up_log))?;
        wait_until("tollgate up", Duration::from_secs(30), || {
            self.guard.check_alive("tollgate up", &up_log)?;
            Ok(std::fs::read_to_string(&up_log)
                .unwrap_or_default()
                .contains("revision 1:"))
        })
        .map_err(|e| anyhow::anyhow!("{e:#}:\n{}", tail(&up_log, 3000)))?;
        print_log(&up_log);

        println!(
            "\n\x1b[1m$ tollgate proxy --agent rules.sock --transparent 127.0.0.1:15001 \
             --dns-transparent 127.0.0.1:15053 --observe-socket observe.sock --audit-log audit.jsonl\
             \x1b[0m\n  (a second process of the same binary: the agent streams it the rule sets)"
        );
        let proxy_log = w.join("proxy.log");
        let mut proxy = Command::new("nsenter");
        proxy
            .arg(&netns)
            .arg(exe)
            .arg("proxy")
            .arg("--agent")
            .arg(&rules)
            .args(["--transparent", "127.0.0.1:15001"])
            .args(["--dns-transparent", "127.0.0.1:15053"])
            .arg("--observe-socket")
            .arg(&observe)
            .arg("--audit-log")
            .arg(w.join("audit.jsonl"));
        self.guard
            .spawn("tollgate proxy", proxy, Some(&proxy_log))?;
        wait_until("tollgate proxy", Duration::from_secs(30), || {
            self.guard.check_alive("tollgate proxy", &proxy_log)?;
            Ok(std::fs::read_to_string(&proxy_log)
                .unwrap_or_default()
                .contains("transparent listener on")
                && observe.exists())
        })
        .map_err(|e| anyhow::anyhow!("{e:#}:\n{}", tail(&proxy_log, 3000)))?;
        // The listeners start once the first version from the agent is in force.
        std::thread::sleep(Duration::from_millis(200));
        print_log(&proxy_log);
        Ok(observe)
    }

    fn http(&self, t: &mut Table, pod: &str, method: &str, path: &str, auth: bool, want: Verdict) {
        let url = format!("http://{}:8080{path}", pod_ip("api-server"));
        let mut c = in_ns(&self.ns(pod), "curl");
        c.args(["-s", "--path-as-is", "--max-time", "3", "-X", method]);
        if auth {
            c.args(["-H", "Authorization: Bearer x"]);
        }
        c.args(["-o", "/dev/null", "-w", "%{http_code}", &url]);
        let (out, _) = output(c);
        let code = out.trim();
        let got = match code {
            "000" | "" => (Verdict::Dropped, "no connection".to_string()),
            "403" => (Verdict::Denied, "403 Forbidden".to_string()),
            c if c.starts_with('2') || c.starts_with('4') || c.starts_with('5') => {
                (Verdict::Allowed, format!("{c} from the server"))
            }
            c => (Verdict::Failed, c.to_string()),
        };
        let req = format!(
            "{method} {path}{}",
            if auth { " (Authorization)" } else { "" }
        );
        t.row(pod, "http", &req, want, got);
    }

    fn grpc(&self, t: &mut Table, g: &Grpc, pod: &str, method: &str, want: Verdict) {
        let mut c = in_ns(&self.ns(pod), "timeout");
        c.arg("10")
            .arg(&g.py)
            .args([
                "-c",
                GRPC_CLIENT,
                &format!("{}:50051", pod_ip("greeter")),
                method,
            ])
            .env("FEAS", &g.feas);
        let (out, _) = output(c);
        let line = out.lines().last().unwrap_or("").trim().to_string();
        let got = if line.starts_with("OK ") {
            (Verdict::Allowed, line)
        } else if line.starts_with("PERMISSION_DENIED") {
            (Verdict::Denied, line)
        } else if line.starts_with("UNAVAILABLE") || line.starts_with("DEADLINE_EXCEEDED") {
            (Verdict::Dropped, line)
        } else {
            (Verdict::Failed, out.trim().replace('\n', " | "))
        };
        t.row(pod, "grpc", method, want, got);
    }

    fn dns(&self, t: &mut Table, pod: &str, name: &str, want: Verdict) {
        let mut c = in_ns(&self.ns(pod), "dig");
        c.args(["+tries=1", "+time=2", "+noall", "+comments", "+answer"])
            .arg(format!("@{}", pod_ip("resolver")))
            .arg(name);
        let (out, _) = output(c);
        let status = out
            .split("status: ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .map(str::to_string);
        let answer = out
            .lines()
            .find(|l| !l.starts_with(';') && l.contains("\tA\t"))
            .and_then(|l| l.split_whitespace().last())
            .unwrap_or("");
        let got = match status.as_deref() {
            Some("NOERROR") => (Verdict::Allowed, format!("NOERROR {answer}")),
            Some("REFUSED") => (Verdict::Denied, "REFUSED".to_string()),
            Some(s) => (Verdict::Failed, s.to_string()),
            None => (Verdict::Dropped, "no answer".to_string()),
        };
        t.row(pod, "dns", &format!("A {name}"), want, got);
    }

    fn tcp(&self, t: &mut Table, pod: &str, to: &str, port: u16, want: Verdict) {
        let got = if tcp_open(&self.ns(pod), &pod_ip(to), port) {
            (Verdict::Allowed, "connected".to_string())
        } else {
            (Verdict::Dropped, "no connection".to_string())
        };
        t.row(pod, "tcp", &format!("connect {to}:{port}"), want, got);
    }

    /// kcat from `pod`: what it printed and whether it exited 0.
    fn kcat(&self, k: &Kafka, pod: &str, args: &[&str], input: Option<&str>) -> (String, bool) {
        let mut c = in_ns(&self.ns(pod), "timeout");
        c.arg("15")
            .arg(&k.kcat)
            .args(["-b", &format!("{}:9092", pod_ip("kafka"))])
            .args([
                "-X",
                &format!("client.id={pod}"),
                "-X",
                "socket.timeout.ms=4000",
            ])
            .args(args);
        let Some(input) = input else {
            return output(c);
        };
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut run = || -> std::io::Result<(String, bool)> {
            use std::io::Write;
            let mut child = c.spawn()?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(input.as_bytes())?;
            }
            let o = child.wait_with_output()?;
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            Ok((s, o.status.success()))
        };
        run().unwrap_or_else(|e| (format!("cannot run kcat: {e}"), false))
    }

    fn kafka(&self, t: &mut Table, k: &Kafka) {
        let judge = |(out, ok): (String, bool), allowed: String| {
            let err = out
                .lines()
                .find(|l| l.contains("ERROR") || l.contains("rror"))
                .map(|l| l.trim().trim_start_matches("% ").to_string());
            if let Some(at) = out.find("Not authorized") {
                let why = out[at..]
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim_end_matches(" (tollgate)");
                (Verdict::Denied, why.to_string())
            } else if out.contains("uthorization failed") {
                let why = if out.contains("Group authorization") {
                    "Group authorization failed"
                } else {
                    "Topic authorization failed"
                };
                (Verdict::Denied, why.to_string())
            } else if ok {
                (Verdict::Allowed, allowed)
            } else {
                (Verdict::Failed, err.unwrap_or(out))
            }
        };
        for (topic, want) in [
            ("orders-eu", Verdict::Allowed),
            ("payments", Verdict::Denied),
            ("orders-secret", Verdict::Denied),
        ] {
            let got = self.kcat(
                k,
                "billing",
                &["-P", "-t", topic, "-X", "message.timeout.ms=4000"],
                Some("m1\nm2\nm3\n"),
            );
            let got = judge(got, "3 messages acknowledged".to_string());
            t.row(
                "billing",
                "kafka",
                &format!("produce {topic} (3 messages)"),
                want,
                got,
            );
        }
        for (group, want) in [
            ("billing-eu", Verdict::Allowed),
            ("analytics", Verdict::Denied),
        ] {
            let (out, ok) = self.kcat(
                k,
                "billing",
                &[
                    "-G",
                    group,
                    "-X",
                    "auto.offset.reset=earliest",
                    "-e",
                    "orders-eu",
                ],
                None,
            );
            let n = out.lines().filter(|l| l.starts_with('m')).count();
            let got = judge((out, ok), format!("{n} messages consumed"));
            t.row(
                "billing",
                "kafka",
                &format!("consume orders-eu as group {group}"),
                want,
                got,
            );
        }
        self.tcp(t, "unauthorized", "kafka", 9092, Verdict::Dropped);
        print!("  what the broker holds (read inside the kafka pod, not through tollgate):");
        for topic in ["orders-eu", "payments", "orders-secret"] {
            let (out, _) = self.kcat(
                k,
                "kafka",
                &["-C", "-t", topic, "-o", "beginning", "-e", "-q"],
                None,
            );
            let n = out.lines().filter(|l| l.starts_with('m')).count();
            print!(" {topic}: {n}");
        }
        println!();
    }
}

fn print_log(path: &Path) {
    for l in std::fs::read_to_string(path).unwrap_or_default().lines() {
        println!("  {l}");
    }
}

struct Kafka {
    tansu: PathBuf,
    kcat: PathBuf,
    py: PathBuf,
}

struct Grpc {
    py: PathBuf,
    feas: PathBuf,
}

fn feas() -> PathBuf {
    std::env::var_os("FEAS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/tollgate-peers"))
}

/// `../shared/peers` beside the repository (from the working directory, or from where this
/// binary was built).
fn peers_dir() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/peers")];
    if let Ok(cwd) = std::env::current_dir() {
        for a in cwd.ancestors().take(4) {
            candidates.push(a.join("shared/peers"));
            candidates.push(a.join("../shared/peers"));
        }
    }
    candidates.into_iter().find(|p| p.join("kcat.sh").exists())
}

fn find_kafka() -> std::result::Result<Kafka, String> {
    let feas = feas();
    let tansu = feas.join("opt/bin/tansu");
    let py = feas.join("venv/bin/python");
    let why = "run scripts/setup-proxy.sh to install them";
    if !tansu.exists() {
        return Err(format!("no tansu broker at {} ({why})", tansu.display()));
    }
    let Some(peers) = peers_dir() else {
        return Err(format!("no ../shared/peers/kcat.sh ({why})"));
    };
    let ok = Command::new(&py)
        .args(["-c", "import confluent_kafka"])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err(format!("no confluent-kafka in {} ({why})", py.display()));
    }
    Ok(Kafka {
        tansu,
        kcat: peers.join("kcat.sh"),
        py,
    })
}

fn find_grpc() -> std::result::Result<Grpc, String> {
    let feas = feas();
    let py = feas.join("venv/bin/python");
    if !feas.join("grpc/helloworld_pb2_grpc.py").exists() {
        return Err(format!(
            "no grpcio stubs in {} (run scripts/setup-proxy.sh)",
            feas.join("grpc").display()
        ));
    }
    let ok = Command::new(&py)
        .args(["-c", "import grpc"])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err(format!(
            "no grpcio in {} (run scripts/setup-proxy.sh)",
            py.display()
        ));
    }
    Ok(Grpc { py, feas })
}

/// Cleans up and exits on SIGINT or SIGTERM.
fn on_signal(guard: Guard) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        eprintln!("\ntollgate demo: interrupted, removing the pods and processes");
        guard.lock().cleanup();
        std::process::exit(130);
    });
}

pub fn run(args: &DemoArgs) -> Result<bool> {
    if !is_root() {
        println!("tollgate demo needs root (network namespaces, eBPF): sudo tollgate demo");
        return Ok(true);
    }
    for tool in ["ip", "nsenter", "curl", "dig", "python3", "dnsmasq"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false);
        if !found {
            bail!("tollgate demo needs `{tool}` (scripts/setup.sh installs it)");
        }
    }
    let exe = std::env::current_exe().context("the path of this binary")?;
    let id = std::process::id();
    let work = std::env::temp_dir().join(format!("tollgate-demo-{id}"));
    let pin_root = PathBuf::from(format!("/sys/fs/bpf/tollgate-demo-{id}"));
    let guard = Guard::default();
    {
        let mut m = guard.lock();
        m.work = Some(work.clone());
        m.pin_root = Some(pin_root.clone());
    }
    on_signal(guard.clone());
    std::fs::create_dir_all(&work)?;
    let demo = Demo {
        id,
        node: format!("tgd{id}-node"),
        work,
        guard,
    };
    let kafka = if args.skip_kafka {
        Err("--skip-kafka".to_string())
    } else {
        find_kafka()
    };
    let grpc = find_grpc();

    println!("\n\x1b[1m== Sidecarless: pods as network namespaces, tollgate on the node ==\x1b[0m");
    let inventory = demo.setup_pods()?;
    println!(
        "endpoints.yaml (pod {{i}} has 10.210.{{i}}.2 behind veth tgd{id}p{{i}} in the node namespace):"
    );
    print!("{inventory}");
    demo.start_api_server()?;
    demo.start_resolver()?;
    let grpc = match grpc {
        Ok(g) => demo
            .start_greeter(&g.py, &g.feas)
            .map(|_| g)
            .map_err(|e| format!("{e:#}")),
        Err(e) => Err(e),
    };
    let kafka = match kafka {
        Ok(k) => demo
            .start_kafka(&k)
            .map(|_| k)
            .map_err(|e| format!("{e:#}")),
        Err(e) => Err(e),
    };
    let policies = demo.write_policies()?;
    println!(
        "policies/: gateway.yaml (conformance/policies/gateway: HTTP and gRPC), dns.yaml \
         (the frontend's DNS egress), kafka.yaml (the broker's Kafka ingress)"
    );
    let observe = demo.start_tollgate(&exe, &policies, &pin_root)?;

    let mut t = Table {
        rows: 0,
        wrong: Vec::new(),
    };
    use Verdict::{Allowed, Denied, Dropped};
    Table::header("HTTP to the api-server:8080 (its ingress rules are L7: gateway.yaml)");
    demo.http(
        &mut t,
        "frontend",
        "GET",
        "/public/index.html",
        false,
        Allowed,
    );
    demo.http(&mut t, "frontend", "GET", "/api/v1/users/7", true, Allowed);
    demo.http(&mut t, "frontend", "GET", "/api/v1/users/7", false, Denied);
    demo.http(
        &mut t,
        "frontend",
        "GET",
        "/public/../admin/users",
        false,
        Denied,
    );
    demo.http(
        &mut t,
        "unauthorized",
        "GET",
        "/public/index.html",
        false,
        Allowed,
    );
    demo.http(&mut t, "unauthorized", "GET", "/admin/users", false, Denied);
    demo.http(&mut t, "admin", "GET", "/admin/users", false, Allowed);
    demo.http(&mut t, "admin", "GET", "/admin/debug/pprof", false, Denied);
    // Allowed; the audit-mode preview policy records that it would deny it.
    demo.http(&mut t, "admin", "DELETE", "/admin/users/7", false, Allowed);

    match &grpc {
        Ok(g) => {
            Table::header("gRPC to the greeter:50051 (helloworld.Greeter for grpc-client only)");
            demo.grpc(
                &mut t,
                g,
                "grpc-client",
                "/helloworld.Greeter/SayHello",
                Allowed,
            );
            demo.grpc(&mut t, g, "grpc-client", "/helloworld.Admin/Reset", Denied);
            demo.grpc(
                &mut t,
                g,
                "unauthorized",
                "/helloworld.Greeter/SayHello",
                Dropped,
            );
        }
        Err(why) => println!("\n\x1b[1m(gRPC part skipped: {why})\x1b[0m"),
    }

    Table::header("DNS from the frontend to the resolver (its egress DNS rules: *.example.com)");
    demo.dns(&mut t, "frontend", "api.example.com", Allowed);
    demo.dns(&mut t, "frontend", "evil.example.org", Denied);
    Table::header("The frontend's egress in the kernel: the api-server and the resolver only");
    demo.tcp(&mut t, "frontend", "admin", 22, Dropped);

    match &kafka {
        Ok(k) => {
            Table::header(
                "Kafka from billing to the broker (kafka.yaml: produce orders-*, consume orders-* \
                 as billing-*, never orders-secret)",
            );
            demo.kafka(&mut t, k);
        }
        Err(why) => println!("\n\x1b[1m(Kafka part skipped: {why})\x1b[0m"),
    }

    std::thread::sleep(Duration::from_millis(500));
    println!(
        "\n\x1b[1m$ tollgate observe --server observe.sock   (the proxy's Observe stream)\x1b[0m"
    );
    let mut obs = Command::new(&exe);
    obs.arg("observe").arg("--server").arg(&observe);
    match obs.stdin(Stdio::null()).spawn() {
        Ok(mut c) => {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        Err(e) => println!("  cannot run tollgate observe: {e}"),
    }

    println!(
        "\n{} requests: {}",
        t.rows,
        if t.wrong.is_empty() {
            "every outcome is what the policy says".to_string()
        } else {
            format!("{} differ from the policy", t.wrong.len())
        }
    );
    for w in &t.wrong {
        println!("  MISMATCH: {w}");
    }

    if args.keep {
        println!(
            "\n--keep: the pods are network namespaces tgd{id}-<pod> (e.g. `ip netns exec \
             tgd{id}-frontend curl http://{}:8080/public/index.html`); files in {}.\n\
             Press Enter or Ctrl-C to remove everything.",
            pod_ip("api-server"),
            demo.work.display()
        );
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
    }
    drop(demo);
    println!(
        "removed the pods, the node namespace, the processes and {}",
        pin_root.display()
    );
    Ok(t.wrong.is_empty())
}
