//! L7 requests as users write them (test files, `tollgate eval` flags), turned into the
//! evaluator's borrowed [`L7Request`].

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use serde::Deserialize;
use tollgate_policy::api::StringLike;
use tollgate_policy::eval::L7Request;
use tollgate_policy::l7;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    pub http: Option<HttpSpec>,
    pub grpc: Option<GrpcSpec>,
    pub kafka: Option<KafkaSpec>,
    pub dns: Option<DnsSpec>,
    pub tls: Option<TlsSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSpec {
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default = "default_path")]
    pub path: String,
    pub host: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringLike>,
}

fn default_method() -> String {
    "GET".to_string()
}

fn default_path() -> String {
    "/".to_string()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcSpec {
    pub service: String,
    pub method: String,
    pub host: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KafkaSpec {
    pub api_key: StringLike,
    pub api_version: Option<i16>,
    #[serde(rename = "clientID")]
    pub client_id: Option<String>,
    #[serde(default)]
    pub topics: Vec<String>,
    #[serde(rename = "groupID")]
    pub group_id: Option<String>,
    #[serde(rename = "transactionalID")]
    pub transactional_id: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSpec {
    pub qname: String,
    /// Accepted for completeness; DNS policy ignores the query type (cnp-semantics §9.2).
    #[serde(rename = "qtype")]
    pub _qtype: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSpec {
    pub sni: Option<String>,
}

/// The request after normalisation, owning its strings.
pub struct Prepared {
    kind: PreparedKind,
}

/// A request that could not be judged: refused before policy, as the proxy does.
pub struct Refused(pub String);

enum PreparedKind {
    Http {
        method: String,
        path: String,
        host: String,
        headers: Vec<(String, String)>,
        grpc: Option<(String, String)>,
    },
    Kafka {
        api_key: i16,
        api_version: i16,
        client_id: Option<String>,
        topics: Vec<String>,
        group_id: Option<String>,
        transactional_id: Option<String>,
    },
    Dns(String),
    Tls(Option<String>),
}

impl RequestSpec {
    /// `Ok(Err(Refused))` for a request the proxy would refuse before policy (bad path).
    pub fn prepare(&self) -> Result<std::result::Result<Prepared, Refused>> {
        let set = [
            self.http.is_some(),
            self.grpc.is_some(),
            self.kafka.is_some(),
            self.dns.is_some(),
            self.tls.is_some(),
        ];
        if set.iter().filter(|s| **s).count() != 1 {
            bail!("a request needs exactly one of http, grpc, kafka, dns or tls");
        }
        let kind = if let Some(h) = &self.http {
            let path = match crate::normalize::path_for_policy(&h.path) {
                Ok(p) => p,
                Err(e) => return Ok(Err(Refused(format!("{e:#}")))),
            };
            PreparedKind::Http {
                method: h.method.clone(),
                path,
                host: h.host.clone().unwrap_or_default(),
                headers: h
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.0.clone()))
                    .collect(),
                grpc: None,
            }
        } else if let Some(g) = &self.grpc {
            PreparedKind::Http {
                method: "POST".to_string(),
                path: format!("/{}/{}", g.service, g.method),
                host: g.host.clone().unwrap_or_default(),
                headers: vec![("content-type".to_string(), "application/grpc".to_string())],
                grpc: Some((g.service.clone(), g.method.clone())),
            }
        } else if let Some(k) = &self.kafka {
            let api_key = match k.api_key.0.parse::<i16>() {
                Ok(n) => n,
                Err(_) => match l7::kafka_api_key(&k.api_key.0) {
                    Some(n) => n,
                    None => bail!("unknown Kafka apiKey `{}`", k.api_key.0),
                },
            };
            PreparedKind::Kafka {
                api_key,
                api_version: k.api_version.unwrap_or(1),
                client_id: k.client_id.clone(),
                topics: k.topics.clone(),
                group_id: k.group_id.clone(),
                transactional_id: k.transactional_id.clone(),
            }
        } else if let Some(d) = &self.dns {
            PreparedKind::Dns(d.qname.clone())
        } else {
            PreparedKind::Tls(self.tls.as_ref().and_then(|t| t.sni.clone()))
        };
        Ok(Ok(Prepared { kind }))
    }
}

impl Prepared {
    /// Run `f` with the evaluator's view of this request.
    pub fn with<R>(&self, f: impl FnOnce(&L7Request<'_>) -> R) -> R {
        match &self.kind {
            PreparedKind::Http {
                method,
                path,
                host,
                headers,
                grpc,
            } => {
                let hdrs: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let req = L7Request::Http {
                    request: l7::HttpRequest {
                        method,
                        path,
                        host,
                        headers: &hdrs,
                    },
                    grpc: grpc.as_ref().map(|(s, m)| l7::GrpcCall {
                        service: s,
                        method: m,
                    }),
                };
                f(&req)
            }
            PreparedKind::Kafka {
                api_key,
                api_version,
                client_id,
                topics,
                group_id,
                transactional_id,
            } => {
                let t: Vec<&str> = topics.iter().map(String::as_str).collect();
                let req = L7Request::Kafka(l7::KafkaRequest {
                    api_key: *api_key,
                    api_version: *api_version,
                    client_id: client_id.as_deref(),
                    topics: &t,
                    group_id: group_id.as_deref(),
                    transactional_id: transactional_id.as_deref(),
                });
                f(&req)
            }
            PreparedKind::Dns(q) => f(&L7Request::Dns { qname: q }),
            PreparedKind::Tls(sni) => f(&L7Request::Tls {
                sni: sni.as_deref(),
            }),
        }
    }
}

/// Check a connection and optional request as the proxy would judge it (shared by `eval` and
/// `test`): a request refused before policy is a denial with reason `malformed`.
pub fn check_request(
    eval: &tollgate_policy::eval::Evaluator,
    inv: &tollgate_policy::endpoints::Inventory,
    from: &tollgate_policy::check::PeerSpec,
    to: &tollgate_policy::check::PeerSpec,
    port: u16,
    protocol: tollgate_policy::model::Protocol,
    spec: Option<&RequestSpec>,
) -> Result<tollgate_policy::check::CheckResult> {
    use tollgate_policy::check::{CheckResult, check};
    use tollgate_policy::eval::Verdict;
    use tollgate_policy::model::Direction;
    let result = match spec.map(RequestSpec::prepare).transpose()? {
        None => check(eval, inv, from, to, port, protocol, None),
        Some(Ok(p)) => p.with(|req| check(eval, inv, from, to, port, protocol, Some(req))),
        Some(Err(Refused(why))) => {
            let deciding = Verdict::malformed(Direction::Ingress, why);
            return Ok(CheckResult {
                decision: deciding.decision,
                deciding,
                egress: None,
                ingress: None,
            });
        }
    };
    result.map_err(|e| anyhow::anyhow!(e))
}
