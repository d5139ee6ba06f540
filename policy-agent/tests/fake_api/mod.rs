//! An in-process fake Kubernetes API server for the agent's Kubernetes-mode tests.
//!
//! No real API server can run where this project's tests run (no cluster, no kind/k3s, no
//! container engine, no network beyond the package registries), so the Kubernetes source is
//! tested against this: plain HTTP/1.1 on 127.0.0.1:0, spoken to by a real `kube::Client`
//! (`kube::Config::new(url)`), implementing what the agent uses, with the semantics that matter:
//!
//! * list (`GET …/plural`) with the collection's `metadata.resourceVersion`, in pages when a
//!   `limit` is given (`metadata.continue`, as kube-runtime's watcher asks for 500 at a time);
//! * watch (`?watch=true|1&resourceVersion=R&allowWatchBookmarks=true`): every event after `R`
//!   from the history, then live events, one JSON object per line; a `BOOKMARK` after the
//!   replay when bookmarks are asked for; `R` older than the compacted history → an `ERROR`
//!   event with a 410 `Expired` Status (what a real API server sends), then the end;
//! * one global resourceVersion counter across all kinds (like etcd), a history of events that
//!   [`Tx::compact`] discards, and [`Tx::drop_watches`] which ends every open watch;
//! * get, create (409 `AlreadyExists` on a name conflict), status patch (JSON merge patch, only
//!   `status` taken), delete (with a UID precondition, 409 on mismatch);
//! * `generation` bumped when anything but metadata/status changes.
//!
//! Kinds listed in [`FakeApi::start_serving`]'s `missing` are answered 404 (not served).
//! Tests change objects directly ([`FakeApi::put`], [`FakeApi::atomically`]) and count requests
//! ([`FakeApi::count`]); [`verdict`] asks the evaluator about a snapshot, as `tollgate eval` does.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tollgate_agent::kubernetes::source::Snapshot;
use tollgate_policy::check::{PeerSpec, check};
use tollgate_policy::eval::{Decision, L7Request};
use tollgate_policy::l7::HttpRequest;
use tollgate_policy::model::Protocol;

/// A kind the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    pub prefix: &'static str,
    pub api_version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
}

pub const KINDS: [Kind; 8] = [
    Kind {
        prefix: "/api/v1",
        api_version: "v1",
        kind: "Pod",
        plural: "pods",
        namespaced: true,
    },
    Kind {
        prefix: "/api/v1",
        api_version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        namespaced: false,
    },
    Kind {
        prefix: "/api/v1",
        api_version: "v1",
        kind: "Event",
        plural: "events",
        namespaced: true,
    },
    Kind {
        prefix: "/apis/networking.k8s.io/v1",
        api_version: "networking.k8s.io/v1",
        kind: "NetworkPolicy",
        plural: "networkpolicies",
        namespaced: true,
    },
    Kind {
        prefix: "/apis/cilium.io/v2",
        api_version: "cilium.io/v2",
        kind: "CiliumNetworkPolicy",
        plural: "ciliumnetworkpolicies",
        namespaced: true,
    },
    Kind {
        prefix: "/apis/cilium.io/v2",
        api_version: "cilium.io/v2",
        kind: "CiliumClusterwideNetworkPolicy",
        plural: "ciliumclusterwidenetworkpolicies",
        namespaced: false,
    },
    Kind {
        prefix: "/apis/tollgate.io/v1alpha1",
        api_version: "tollgate.io/v1alpha1",
        kind: "TollgatePolicy",
        plural: "tollgatepolicies",
        namespaced: true,
    },
    Kind {
        prefix: "/apis/tollgate.io/v1alpha1",
        api_version: "tollgate.io/v1alpha1",
        kind: "TollgateIdentity",
        plural: "tollgateidentities",
        namespaced: false,
    },
];

fn kind_by_name(kind: &str) -> Kind {
    *KINDS
        .iter()
        .find(|k| k.kind == kind)
        .unwrap_or_else(|| panic!("the fake does not serve kind {kind}"))
}

type Key = (&'static str, String, String); // plural, namespace ("" if cluster-scoped), name

struct Watch {
    plural: &'static str,
    namespace: Option<String>,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
pub struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// (rv, type, plural, namespace, object) after `compacted`.
    history: Vec<(u64, &'static str, &'static str, String, Value)>,
    compacted: u64,
    watches: Vec<Watch>,
    counts: HashMap<(&'static str, &'static str), usize>,
    missing: Vec<&'static str>,
    hold_creates: Option<(usize, Vec<oneshot::Sender<()>>)>,
    uid: u64,
}

/// Changes made under one lock: no watch sees a state in between.
pub struct Tx<'a>(&'a mut State);

fn line(typ: &str, obj: &Value) -> Bytes {
    let mut s = serde_json::to_vec(&json!({"type": typ, "object": obj})).unwrap();
    s.push(b'\n');
    Bytes::from(s)
}

impl State {
    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn emit(&mut self, typ: &'static str, plural: &'static str, ns: &str, obj: Value) {
        let rv = self.rv;
        let l = line(typ, &obj);
        self.watches.retain(|w| {
            if w.plural != plural || w.namespace.as_deref().is_some_and(|n| n != ns) {
                return true;
            }
            w.tx.send(l.clone()).is_ok()
        });
        self.history.push((rv, typ, plural, ns.to_string(), obj));
    }

    fn count(&mut self, verb: &'static str, plural: &'static str) {
        *self.counts.entry((verb, plural)).or_default() += 1;
    }

    /// Create or replace `obj` (kind from the object); generation follows spec changes.
    fn put(&mut self, mut obj: Value) -> Value {
        let kind = kind_by_name(obj["kind"].as_str().expect("kind"));
        obj["apiVersion"] = json!(kind.api_version);
        let name = obj["metadata"]["name"].as_str().expect("name").to_string();
        let ns = if kind.namespaced {
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        let key = (kind.plural, ns.clone(), name);
        let rv = self.bump();
        let old = self.objects.get(&key).cloned();
        let body = |v: &Value| {
            let mut v = v.clone();
            if let Some(o) = v.as_object_mut() {
                o.remove("metadata");
                o.remove("status");
            }
            v
        };
        let (typ, generation) = match &old {
            None => ("ADDED", 1),
            Some(o) => {
                let g = o["metadata"]["generation"].as_i64().unwrap_or(1);
                ("MODIFIED", if body(o) == body(&obj) { g } else { g + 1 })
            }
        };
        let uid = match &old {
            Some(o) => o["metadata"]["uid"].clone(),
            None => {
                self.uid += 1;
                json!(format!("uid-{}", self.uid))
            }
        };
        if obj.get("status").is_none()
            && let Some(st) = old.as_ref().and_then(|o| o.get("status"))
        {
            obj["status"] = st.clone();
        }
        let m = &mut obj["metadata"];
        m["resourceVersion"] = json!(rv.to_string());
        m["uid"] = uid;
        m["generation"] = json!(generation);
        m["creationTimestamp"] = json!("2026-12-01T00:00:00Z");
        if kind.namespaced {
            m["namespace"] = json!(ns);
        }
        self.objects.insert(key, obj.clone());
        self.emit(typ, kind.plural, &ns, obj.clone());
        obj
    }

    fn remove(&mut self, plural: &'static str, ns: &str, name: &str) -> Option<Value> {
        let mut obj = self
            .objects
            .remove(&(plural, ns.to_string(), name.to_string()))?;
        let rv = self.bump();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.emit("DELETED", plural, ns, obj.clone());
        Some(obj)
    }
}

impl Tx<'_> {
    pub fn put(&mut self, obj: Value) -> Value {
        self.0.put(obj)
    }

    pub fn remove(&mut self, kind: &str, ns: &str, name: &str) -> Option<Value> {
        self.0.remove(kind_by_name(kind).plural, ns, name)
    }

    /// End every open watch (as an API server restart or a watch timeout does).
    pub fn drop_watches(&mut self) {
        self.0.watches.clear();
    }

    /// Forget the history: a watch from an older resourceVersion gets 410 Gone.
    pub fn compact(&mut self) {
        self.0.compacted = self.0.rv;
        self.0.history.clear();
    }
}

/// The running fake (stops when dropped).
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn status(code: u16, reason: &str, message: String) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

type Body = BoxBody<Bytes, Infallible>;

fn reply(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(v).unwrap())).boxed())
        .unwrap()
}

fn error(code: u16, reason: &str, message: String) -> Response<Body> {
    reply(code, &status(code, reason, message))
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// A continue token: hex of `rv`, namespace and name (no characters a query string escapes).
fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    format!("{rv}\0{ns}\0{name}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(token: &str) -> Option<(u64, (String, String))> {
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    let text = String::from_utf8(bytes?).ok()?;
    let mut parts = text.split('\0');
    let rv = parts.next()?.parse().ok()?;
    Some((rv, (parts.next()?.to_string(), parts.next()?.to_string())))
}

/// Where a request goes: kind, namespace, name, subresource.
type Route = (Kind, Option<String>, Option<String>, Option<String>);

fn route(path: &str) -> Option<Route> {
    for k in KINDS {
        let Some(rest) = path.strip_prefix(k.prefix) else {
            continue;
        };
        let segs: Vec<&str> = rest
            .trim_start_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        let (ns, segs) = if segs.len() >= 3 && segs[0] == "namespaces" {
            (Some(segs[1].to_string()), &segs[2..])
        } else {
            (None, &segs[..])
        };
        if segs.first() != Some(&k.plural) {
            continue;
        }
        return Some((
            k,
            ns,
            segs.get(1).map(|s| s.to_string()),
            segs.get(2).map(|s| s.to_string()),
        ));
    }
    None
}

async fn handle(
    state: Arc<Mutex<State>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let Some((kind, ns, name, sub)) = route(&path) else {
        return Ok(error(404, "NotFound", format!("no route {path}")));
    };
    if state.lock().unwrap().missing.contains(&kind.plural) {
        return Ok(error(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        ));
    }
    let ns_key = |ns: &Option<String>| {
        if kind.namespaced {
            ns.clone().unwrap_or_default()
        } else {
            String::new()
        }
    };
    match (method, name, sub) {
        (Method::GET, None, None) => {
            let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
            if watching {
                return Ok(watch(&state, kind, ns, &query));
            }
            let mut s = state.lock().unwrap();
            s.count("list", kind.plural);
            // Pages (`limit`, `continue`) as a real API server serves them: the continue token
            // names the last object returned and the resourceVersion of the first page, which
            // every page reports (changes in between reach the watch from that version).
            let limit: usize = query
                .get("limit")
                .and_then(|l| l.parse().ok())
                .filter(|l| *l > 0)
                .unwrap_or(usize::MAX);
            let (list_rv, after) = match query.get("continue").and_then(|c| decode_continue(c)) {
                Some((rv, key)) => (rv, Some(key)),
                None => (s.rv, None),
            };
            let mut matching = s.objects.iter().filter(|((p, n, name), _)| {
                *p == kind.plural
                    && ns.as_ref().is_none_or(|ns| ns == n)
                    && after.as_ref().is_none_or(|a| (n, name) > (&a.0, &a.1))
            });
            let mut items: Vec<Value> = Vec::new();
            let mut last = None;
            for ((_, n, name), v) in matching.by_ref().take(limit) {
                items.push(v.clone());
                last = Some((n.clone(), name.clone()));
            }
            let mut metadata = json!({"resourceVersion": list_rv.to_string()});
            if matching.next().is_some()
                && let Some((n, name)) = last
            {
                metadata["continue"] = json!(encode_continue(list_rv, &n, &name));
            }
            Ok(reply(
                200,
                &json!({"kind": format!("{}List", kind.kind), "apiVersion": kind.api_version,
                "metadata": metadata, "items": items}),
            ))
        }
        (Method::GET, Some(name), None) => {
            let mut s = state.lock().unwrap();
            s.count("get", kind.plural);
            match s.objects.get(&(kind.plural, ns_key(&ns), name.clone())) {
                Some(o) => Ok(reply(200, o)),
                None => Ok(error(
                    404,
                    "NotFound",
                    format!("{} \"{name}\" not found", kind.plural),
                )),
            }
        }
        (Method::POST, None, None) => {
            let mut obj: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return Ok(error(400, "BadRequest", e.to_string())),
            };
            let wait = {
                let mut s = state.lock().unwrap();
                match s.hold_creates.take() {
                    Some((n, mut waiting)) if waiting.len() + 1 < n => {
                        let (tx, rx) = oneshot::channel();
                        waiting.push(tx);
                        s.hold_creates = Some((n, waiting));
                        Some(rx)
                    }
                    Some((_, waiting)) => {
                        for w in waiting {
                            let _ = w.send(());
                        }
                        None
                    }
                    None => None,
                }
            };
            if let Some(rx) = wait {
                let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
            }
            let mut s = state.lock().unwrap();
            s.count("create", kind.plural);
            let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
                return Ok(error(
                    422,
                    "Invalid",
                    "metadata.name: Required value".into(),
                ));
            };
            let nsk = ns_key(&ns);
            if s.objects
                .contains_key(&(kind.plural, nsk.clone(), name.clone()))
            {
                s.count("conflict", kind.plural);
                return Ok(error(
                    409,
                    "AlreadyExists",
                    format!("{} \"{name}\" already exists", kind.plural),
                ));
            }
            obj["kind"] = json!(kind.kind);
            if kind.namespaced {
                obj["metadata"]["namespace"] = json!(nsk);
            }
            let created = s.put(obj);
            Ok(reply(201, &created))
        }
        (Method::PATCH, Some(name), Some(sub)) if sub == "status" => {
            let patch: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let mut s = state.lock().unwrap();
            s.count("patch-status", kind.plural);
            let key = (kind.plural, ns_key(&ns), name.clone());
            let Some(mut obj) = s.objects.get(&key).cloned() else {
                return Ok(error(
                    404,
                    "NotFound",
                    format!("{} \"{name}\" not found", kind.plural),
                ));
            };
            let mut patched = obj.clone();
            merge(&mut patched, &patch);
            obj["status"] = patched.get("status").cloned().unwrap_or(Value::Null);
            let rv = s.bump();
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            s.objects.insert(key, obj.clone());
            s.emit("MODIFIED", kind.plural, &ns_key(&ns), obj.clone());
            Ok(reply(200, &obj))
        }
        (Method::DELETE, Some(name), None) => {
            let opts: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let mut s = state.lock().unwrap();
            s.count("delete", kind.plural);
            let key = (kind.plural, ns_key(&ns), name.clone());
            let Some(obj) = s.objects.get(&key) else {
                return Ok(error(
                    404,
                    "NotFound",
                    format!("{} \"{name}\" not found", kind.plural),
                ));
            };
            if let Some(uid) = opts["preconditions"]["uid"].as_str()
                && obj["metadata"]["uid"] != uid
            {
                return Ok(error(
                    409,
                    "Conflict",
                    "Precondition failed: UID in precondition".into(),
                ));
            }
            s.remove(kind.plural, &key.1, &name);
            Ok(reply(
                200,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
            ))
        }
        (m, _, _) => Ok(error(405, "MethodNotAllowed", format!("{m} {path}"))),
    }
}

fn watch(
    state: &Arc<Mutex<State>>,
    kind: Kind,
    ns: Option<String>,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    {
        let mut s = state.lock().unwrap();
        s.count("watch", kind.plural);
        let from: Option<u64> = query
            .get("resourceVersion")
            .and_then(|r| r.parse().ok())
            .filter(|r| *r != 0);
        let in_ns = |n: &str| ns.as_deref().is_none_or(|ns| ns == n);
        let mut gone = false;
        match from {
            Some(r) if r < s.compacted => {
                let status = status(
                    410,
                    "Expired",
                    format!("too old resource version: {r} ({})", s.compacted),
                );
                let _ = tx.send(line("ERROR", &status));
                s.count("gone", kind.plural);
                gone = true;
            }
            Some(r) => {
                for (rv, typ, p, n, o) in &s.history {
                    if *rv > r && *p == kind.plural && in_ns(n) {
                        let _ = tx.send(line(typ, o));
                    }
                }
            }
            // No resourceVersion: start now, with the current objects as ADDED.
            None => {
                for ((p, n, _), o) in &s.objects {
                    if *p == kind.plural && in_ns(n) {
                        let _ = tx.send(line("ADDED", o));
                    }
                }
            }
        }
        if !gone {
            if query.get("allowWatchBookmarks").map(String::as_str) == Some("true") {
                let bm = json!({"kind": kind.kind, "apiVersion": kind.api_version,
                                "metadata": {"resourceVersion": s.rv.to_string()}});
                let _ = tx.send(line("BOOKMARK", &bm));
            }
            s.watches.push(Watch {
                plural: kind.plural,
                namespace: ns,
                tx,
            });
        }
    }
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) })
            .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

impl FakeApi {
    pub async fn start() -> FakeApi {
        FakeApi::start_serving(&[]).await
    }

    /// A fake that answers 404 for the kinds in `missing` (plurals).
    pub async fn start_serving(missing: &[&'static str]) -> FakeApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        FakeApi::serve(listener, missing)
    }

    /// A fake serving on `listener` (bound by the caller: in another network namespace, say,
    /// for a process that runs there). Call from within a Tokio runtime.
    pub fn start_on(listener: std::net::TcpListener) -> FakeApi {
        listener.set_nonblocking(true).unwrap();
        FakeApi::serve(tokio::net::TcpListener::from_std(listener).unwrap(), &[])
    }

    fn serve(listener: tokio::net::TcpListener, missing: &[&'static str]) -> FakeApi {
        let state = Arc::new(Mutex::new(State {
            missing: missing.to_vec(),
            ..State::default()
        }));
        let url = format!("http://{}", listener.local_addr().unwrap());
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeApi { state, url, task }
    }

    /// Write a kubeconfig file pointing at this fake (no credentials: it asks for none).
    pub fn write_kubeconfig(&self, path: &std::path::Path) {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context: {{cluster: fake, user: u}}\ncurrent-context: c\n",
                self.url
            ),
        )
        .unwrap();
    }

    /// A client of this fake (plain HTTP).
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url.parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    pub fn put(&self, obj: Value) -> Value {
        self.state.lock().unwrap().put(obj)
    }

    /// The namespace `ns` (no labels) and a pod per (name, IP) labelled `app: <name>`.
    pub fn put_app_pods(&self, ns: &str, pods: &[(&str, &str)]) {
        self.put(namespace(ns, json!({})));
        for (name, ip) in pods {
            self.put(pod(ns, name, ip, json!({"app": name})));
        }
    }

    pub fn remove(&self, kind: &str, ns: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .remove(kind_by_name(kind).plural, ns, name)
    }

    /// Run `f` under the lock: watches see all its changes or none.
    pub fn atomically<R>(&self, f: impl FnOnce(&mut Tx<'_>) -> R) -> R {
        let mut s = self.state.lock().unwrap();
        f(&mut Tx(&mut s))
    }

    pub fn get(&self, kind: &str, ns: &str, name: &str) -> Option<Value> {
        let k = kind_by_name(kind);
        self.state
            .lock()
            .unwrap()
            .objects
            .get(&(k.plural, ns.to_string(), name.to_string()))
            .cloned()
    }

    pub fn list(&self, kind: &str) -> Vec<Value> {
        let k = kind_by_name(kind);
        self.state
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|((p, _, _), _)| *p == k.plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Requests of `verb` (`list`, `watch`, `get`, `create`, `conflict`, `gone`,
    /// `patch-status`, `delete`) on `kind`.
    pub fn count(&self, verb: &str, kind: &str) -> usize {
        let k = kind_by_name(kind);
        self.state
            .lock()
            .unwrap()
            .counts
            .iter()
            .filter(|((v, p), _)| *v == verb && *p == k.plural)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Open watches of `kind`.
    pub fn watches(&self, kind: &str) -> usize {
        let k = kind_by_name(kind);
        let mut s = self.state.lock().unwrap();
        s.watches.retain(|w| !w.tx.is_closed());
        s.watches.iter().filter(|w| w.plural == k.plural).count()
    }

    /// Hold creates until `n` have arrived, then let them through together (a race).
    pub fn hold_creates(&self, n: usize) {
        self.state.lock().unwrap().hold_creates = Some((n, Vec::new()));
    }
}

/// Poll `f` every 20 ms until it returns `Some`, at most `secs` seconds.
pub async fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {secs} s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The decision for `from` → `to`:`port` (an HTTP GET of `path`, if given).
pub fn verdict(snap: &Snapshot, from: &str, to: &str, port: u16, path: Option<&str>) -> Decision {
    let eval = snap.evaluator();
    let req = path.map(|p| L7Request::Http {
        request: HttpRequest {
            method: "GET",
            path: p,
            host: "api",
            headers: &[],
        },
        grpc: None,
    });
    check(
        &eval,
        &snap.inventory,
        &PeerSpec::Endpoint(from.into()),
        &PeerSpec::Endpoint(to.into()),
        port,
        Protocol::Tcp,
        req.as_ref(),
    )
    .unwrap_or_else(|e| panic!("{from} -> {to}: {e}"))
    .decision
}

// Object builders.

pub fn namespace(name: &str, labels: Value) -> Value {
    json!({"kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

pub fn pod(ns: &str, name: &str, ip: &str, labels: Value) -> Value {
    json!({"kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
           "spec": {"serviceAccountName": "default", "containers": [{"name": "main", "ports": [{"name": "http", "containerPort": 8080}]}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

pub fn policy(kind: &str, ns: Option<&str>, name: &str, spec: Value) -> Value {
    let mut meta = json!({"name": name});
    if let Some(ns) = ns {
        meta["namespace"] = json!(ns);
    }
    json!({"kind": kind, "metadata": meta, "spec": spec})
}
