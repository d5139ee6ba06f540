//! `tollgate up --kubernetes`: the Kubernetes source as `tollgate up`'s [`Input`].
//!
//! Every snapshot of the source (policy objects, pods, namespaces, identities: the same as
//! `tollgate agent --kubernetes` compiles) becomes one revision: the pods of this node are the
//! endpoints the datapath attaches to, each on the interface the kernel's route to its IP leads
//! to (`tollgate_agent::kubernetes::node`), and every pod is a known peer. A local pod whose
//! interface is not found is reported with the reason and looked for again on every snapshot
//! and, while there is one, every `--poll-ms`; every `--poll-ms` the attached interfaces are
//! checked to be the same interfaces still (a pod recreated under its name gets a new veth of
//! the old name, which is attached again).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tollgate_agent::kubernetes::node::{self, NodeView};
use tollgate_agent::kubernetes::source::{Running, Snapshot};
use tollgate_agent::route;
use tollgate_proxy::PolicyState;

use crate::up::{Input, Loaded, Next, UpArgs};

pub(crate) struct Kube {
    running: Running,
    node: String,
    current: Arc<Snapshot>,
    /// What the last revision attached and could not: a retry that finds the same is no
    /// change.
    last: (Vec<(String, String)>, Vec<String>),
    /// The index of each interface the last revision attached to: a name that comes back on
    /// a new interface (a pod deleted and created again under its name, between two
    /// snapshots) is attached again.
    last_ifindex: Vec<(String, Option<u32>)>,
    /// Problems already printed (each is printed once while it lasts).
    printed: BTreeSet<String>,
    retry: Duration,
    /// Whether rule sets are served (`--rule-socket`): rendering the inventory of a large
    /// cluster is not free.
    publish: bool,
}

impl Kube {
    /// Connect, wait for the first snapshot, and load it.
    pub(crate) async fn start(args: &UpArgs) -> Result<(Kube, Loaded)> {
        let node = args.kube.node_name();
        let mut running = args.kube.start().await?;
        let current = running.snapshots.borrow_and_update().clone();
        for k in &current.not_served {
            eprintln!("tollgate up: {k} is not served by this cluster (not watched)");
        }
        eprintln!(
            "tollgate up: Kubernetes source: node {node}, {} pods, {} policy objects",
            current.inventory.endpoints.len(),
            current.documents.len()
        );
        let mut me = Kube {
            running,
            node,
            current: current.clone(),
            last: Default::default(),
            last_ifindex: Vec::new(),
            printed: BTreeSet::new(),
            retry: Duration::from_millis(args.poll_ms.max(10)),
            publish: args.rule_socket.is_some(),
        };
        let view = me.view(&current);
        let first = me.load(&current, view, Instant::now());
        Ok((me, first))
    }

    fn view(&self, snap: &Snapshot) -> NodeView {
        node::view(&snap.inventory, &self.node, &mut node::interface_of)
    }

    /// The revision of `snap` as `view` sees it; the snapshot's problems not printed before are
    /// printed.
    fn load(&mut self, snap: &Snapshot, view: NodeView, since: Instant) -> Loaded {
        let problems: BTreeSet<String> = snap.problems.iter().cloned().collect();
        for p in problems.difference(&self.printed) {
            eprintln!("tollgate up: Kubernetes snapshot {}: {p}", snap.revision);
        }
        self.printed = problems;
        let not_enforced = view
            .not_enforced
            .iter()
            .map(|l| {
                format!(
                    "{l} (looked for again on every change and every {} ms)",
                    self.retry.as_millis()
                )
            })
            .collect();
        self.last_ifindex = view
            .attached
            .iter()
            .map(|(_, i)| (i.clone(), route::ifindex(i)))
            .collect();
        self.last = (view.attached, view.not_enforced);
        Loaded {
            state: PolicyState::new(snap.policies.clone(), view.inventory, 0),
            rule_sets: if self.publish {
                node::rule_sets(snap)
            } else {
                Vec::new()
            },
            not_enforced,
            since,
        }
    }
}

impl Input for Kube {
    fn node(&self) -> Option<String> {
        Some(self.node.clone())
    }

    async fn next(&mut self) -> Result<Next> {
        loop {
            tokio::select! {
                changed = self.running.snapshots.changed() => {
                    if changed.is_err() {
                        anyhow::bail!("the Kubernetes source stopped");
                    }
                    let since = Instant::now();
                    let snap = self.running.snapshots.borrow_and_update().clone();
                    self.current = snap.clone();
                    let view = self.view(&snap);
                    return Ok(Next::Apply(Box::new(self.load(&snap, view, since))));
                }
                _ = tokio::time::sleep(self.retry) => {
                    let renewed = self
                        .last_ifindex
                        .iter()
                        .any(|(i, idx)| route::ifindex(i) != *idx);
                    if !renewed && self.last.1.is_empty() {
                        continue;
                    }
                    let since = Instant::now();
                    let snap = self.current.clone();
                    let view = self.view(&snap);
                    if renewed
                        || (&view.attached, &view.not_enforced) != (&self.last.0, &self.last.1)
                    {
                        return Ok(Next::Apply(Box::new(self.load(&snap, view, since))));
                    }
                }
            }
        }
    }
}
