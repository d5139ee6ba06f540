//! One proxied connection as policy sees it: who the source and destination are, which port
//! policies of theirs apply, and how a request on it is judged. Shared by the HTTP and Kafka
//! paths so both decide exactly as `tollgate eval` does.

use std::net::SocketAddr;
use std::sync::Arc;

use tollgate_policy::check::combine;
use tollgate_policy::eval::{L7Request, PortPolicy, Verdict};
use tollgate_policy::model::Direction;
use tollgate_policy::peer::Remote;

use crate::audit::Peer;
use crate::fqdn::FqdnHold;
use crate::state::PolicyState;

#[derive(Debug)]
pub(crate) struct Flow {
    /// The policy in force when the connection started: it decides all of the connection.
    pub state: Arc<PolicyState>,
    pub peer: SocketAddr,
    /// Where the connection's traffic goes.
    pub upstream: SocketAddr,
    /// The port policy rules name (the destination's port as the workload addresses it).
    pub policy_port: u16,
    pub egress: Option<Arc<PortPolicy>>,
    pub ingress: Option<Arc<PortPolicy>>,
    pub src_remote: Remote,
    pub dst_remote: Remote,
    /// A connection to a learned IP keeps that IP in the FQDN cache past its TTL.
    _fqdn_hold: Option<FqdnHold>,
}

impl Flow {
    /// The flow from `peer` to the endpoint `dest_idx` (or whoever owns `upstream`'s IP) on
    /// `port`.
    pub fn open(
        state: Arc<PolicyState>,
        dest_idx: Option<usize>,
        port: u16,
        upstream: SocketAddr,
        peer: SocketAddr,
    ) -> Flow {
        let egress = state
            .endpoint_by_ip(peer.ip())
            .map(|i| state.port_policy(i, Direction::Egress, port));
        let ingress = dest_idx.map(|i| state.port_policy(i, Direction::Ingress, port));
        let dst_remote = match dest_idx {
            Some(i) => Remote::endpoint(state.endpoint(i)),
            None => state.remote(upstream.ip()),
        };
        let fqdn_hold = (!dst_remote.fqdns.is_empty()).then(|| state.fqdn.hold(upstream.ip()));
        Flow {
            src_remote: state.remote(peer.ip()),
            state,
            peer,
            upstream,
            policy_port: port,
            egress,
            ingress,
            dst_remote,
            _fqdn_hold: fqdn_hold,
        }
    }

    /// The verdict on the flow (`None`) or on one request: the source's egress and the
    /// destination's ingress, combined as `tollgate eval` does.
    pub fn decide(&self, request: Option<&L7Request<'_>>) -> Verdict {
        let e = self
            .egress
            .as_ref()
            .map(|pp| pp.evaluate(&self.dst_remote, request));
        let i = self
            .ingress
            .as_ref()
            .map(|pp| pp.evaluate(&self.src_remote, request));
        let mut v = combine(e.as_ref(), i.as_ref());
        // Header edits of both sides apply to an allowed request.
        v.header_edits = e
            .into_iter()
            .chain(i)
            .flat_map(|x| x.header_edits)
            .collect();
        v
    }

    /// Whether either side has L7 rules on this port.
    pub fn has_l7(&self) -> bool {
        self.egress.as_ref().is_some_and(|p| p.has_l7())
            || self.ingress.as_ref().is_some_and(|p| p.has_l7())
    }

    /// The L7 protocol this flow's rules speak (`"http"`, `"kafka"`, …), if any.
    pub fn l7_kind(&self) -> Option<&'static str> {
        self.ingress
            .as_ref()
            .and_then(|p| p.l7_kind(&self.src_remote))
            .or_else(|| {
                self.egress
                    .as_ref()
                    .and_then(|p| p.l7_kind(&self.dst_remote))
            })
    }

    /// Source and destination as audit records show them.
    pub fn audit_peers(&self) -> (Peer, Peer) {
        let dst_ip = self.dst_remote.ip.unwrap_or_else(|| self.upstream.ip());
        (
            self.state
                .audit_peer(&self.src_remote, self.peer.ip(), self.peer.port()),
            self.state
                .audit_peer(&self.dst_remote, dst_ip, self.policy_port),
        )
    }
}
