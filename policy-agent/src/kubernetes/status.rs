//! Telling users what the agent made of their objects.
//!
//! * `TollgatePolicy` (ours): a `Valid` condition on `status` (status subresource, JSON merge
//!   patch) — `True`/`Accepted`, or `False`/`InvalidRules` with one line per problem
//!   (`TollgatePolicy ns/name: spec.ingress[0]…: reason`), and `observedGeneration`. Written only
//!   when it differs from what the object shows, so the patch's own watch event changes nothing.
//! * Cilium's kinds and NetworkPolicy (whose status we do not own): a `Warning` Event
//!   `InvalidPolicy` on the object. Its name is derived from the object's UID, generation and
//!   message, so every node (and every recompile) creates the same Event once: a second create
//!   gets 409 and is not repeated.

use std::collections::HashSet;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use super::objects::PolicyKind;

/// Longest condition or event message written; longer lists are cut with a count.
pub const MAX_MESSAGE: usize = 16 * 1024;

/// `problems` joined one per line, at most [`MAX_MESSAGE`] bytes (then `… and N more`).
pub fn message(problems: &[String]) -> String {
    let mut out = String::new();
    for (i, p) in problems.iter().enumerate() {
        if out.len() + p.len() + 1 > MAX_MESSAGE {
            out.push_str(&format!("… and {} more", problems.len() - i));
            break;
        }
        out.push_str(p);
        out.push('\n');
    }
    out.trim_end().to_string()
}

/// The `Valid` condition for an object with `problems` (without `lastTransitionTime`).
pub fn valid_condition(problems: &[String], generation: Option<i64>) -> Value {
    let (status, reason, msg) = if problems.is_empty() {
        ("True", "Accepted", "all rules loaded".to_string())
    } else {
        ("False", "InvalidRules", message(problems))
    };
    let mut c = json!({"type": "Valid", "status": status, "reason": reason, "message": msg});
    if let Some(g) = generation {
        c["observedGeneration"] = json!(g);
    }
    c
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// FNV-1a: a hash that is the same on every node and every build.
fn fnv(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Writes conditions and events (see the module docs).
pub struct StatusWriter {
    client: Client,
    /// This agent's name in events (the node name, when known).
    instance: String,
    /// Events already created (or found existing), by name.
    posted: HashSet<(String, String)>,
    /// The condition last written per object (UID, generation): the watch may not have shown
    /// our patch yet when the next recompile comes.
    written: std::collections::HashMap<(String, i64), Value>,
}

impl std::fmt::Debug for StatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusWriter")
            .field("instance", &self.instance)
            .field("posted", &self.posted.len())
            .finish()
    }
}

impl StatusWriter {
    pub fn new(client: Client, instance: String) -> Self {
        StatusWriter {
            client,
            instance,
            posted: HashSet::new(),
            written: Default::default(),
        }
    }

    /// Forget what was written for objects other than those with these UIDs (deleted ones).
    pub fn forget_others<'a>(&mut self, uids: impl IntoIterator<Item = &'a str>) {
        let live: HashSet<&str> = uids.into_iter().collect();
        self.written
            .retain(|(uid, _), _| live.contains(uid.as_str()));
    }

    /// Patch the `Valid` condition of the TollgatePolicy `obj` if it differs; `Ok(true)` when a
    /// patch was sent.
    pub async fn tollgate_policy(
        &mut self,
        kind: &PolicyKind,
        obj: &DynamicObject,
        problems: &[String],
    ) -> Result<bool> {
        let mut want = valid_condition(problems, obj.metadata.generation);
        let current = obj.data["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Valid"));
        let same = |k: &str, c: &Value| c.get(k) == want.get(k);
        let equal = |c: &Value| {
            ["status", "reason", "message", "observedGeneration"]
                .iter()
                .all(|k| same(k, c))
        };
        let key = (
            obj.uid().unwrap_or_default(),
            obj.metadata.generation.unwrap_or(0),
        );
        if self.written.get(&key).is_some_and(equal) {
            return Ok(false);
        }
        if let Some(c) = current {
            if equal(c) {
                return Ok(false);
            }
            if same("status", c)
                && let Some(t) = c.get("lastTransitionTime")
            {
                want["lastTransitionTime"] = t.clone();
            }
        }
        if want.get("lastTransitionTime").is_none() {
            want["lastTransitionTime"] = json!(now());
        }
        let name = obj.name_any();
        let ns = obj.namespace().unwrap_or_default();
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &ns, &kind.api_resource());
        let patch = json!({"status": {"conditions": [want]}});
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("writing the status of {}", kind.source_name(obj)))?;
        // Older generations of this object will not be written again.
        self.written.retain(|(uid, _), _| *uid != key.0);
        self.written.insert(key, want);
        Ok(true)
    }

    /// Create the `InvalidPolicy` Warning event for `obj` unless it exists; `Ok(true)` when
    /// created.
    pub async fn invalid_event(
        &mut self,
        kind: &PolicyKind,
        obj: &DynamicObject,
        problems: &[String],
    ) -> Result<bool> {
        let msg = message(problems);
        let uid = obj.uid().unwrap_or_default();
        let generation = obj.metadata.generation.unwrap_or(0).to_string();
        let obj_name = obj.name_any();
        let prefix: String = obj_name.chars().take(200).collect();
        let name = format!("{prefix}.tollgate-{:016x}", fnv(&[&uid, &generation, &msg]));
        // Events of cluster-scoped objects live in `default`, as kubectl shows them.
        let ns = obj.namespace().unwrap_or_else(|| "default".to_string());
        if self.posted.contains(&(ns.clone(), name.clone())) {
            return Ok(false);
        }
        let t = Time(now().parse().context("the clock")?);
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some(kind.api_version()),
                kind: Some(kind.kind.to_string()),
                name: Some(obj_name),
                namespace: obj.namespace(),
                uid: obj.uid(),
                resource_version: obj.resource_version(),
                ..ObjectReference::default()
            },
            reason: Some("InvalidPolicy".to_string()),
            message: Some(msg),
            type_: Some("Warning".to_string()),
            source: Some(EventSource {
                component: Some("tollgate-agent".to_string()),
                host: Some(self.instance.clone()),
            }),
            reporting_component: Some("tollgate-agent".to_string()),
            reporting_instance: Some(self.instance.clone()),
            first_timestamp: Some(t.clone()),
            last_timestamp: Some(t),
            count: Some(1),
            ..Event::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        let created = match api.create(&PostParams::default(), &event).await {
            Ok(_) => true,
            Err(kube::Error::Api(s)) if s.code == 409 => false,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("creating an event for {}", kind.source_name(obj)));
            }
        };
        self.posted.insert((ns, name));
        Ok(created)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_lists_problems_and_long_lists_are_cut_with_a_count() {
        let c = valid_condition(&["a: x: bad".to_string()], Some(3));
        assert_eq!(c["status"], "False");
        assert_eq!(c["message"], "a: x: bad");
        assert_eq!(c["observedGeneration"], 3);
        let many: Vec<String> = (0..2000)
            .map(|i| format!("TollgatePolicy n/p: spec.ingress[{i}]: bad"))
            .collect();
        let m = message(&many);
        assert!(m.len() <= MAX_MESSAGE + 32, "{}", m.len());
        assert!(m.ends_with("more"), "{m}");
        assert_eq!(valid_condition(&[], None)["status"], "True");
    }

    #[test]
    fn event_names_are_stable() {
        assert_eq!(fnv(&["a", "b"]), fnv(&["a", "b"]));
        assert_ne!(fnv(&["ab", ""]), fnv(&["a", "b"]));
    }
}
