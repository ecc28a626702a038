//! A Service port's endpoints from its EndpointSlices, and kube-proxy's
//! categorization of them (readiness, internalTrafficPolicy, topology).

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use socklb_table::Protocol;

use super::{
    Policy,
    trim::{Family, TrimmedSlice},
};

/// One endpoint as kube-proxy's categorization sees it.
#[derive(Debug)]
pub(super) struct Endpoint<'a> {
    backend: SocketAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: Option<&'a str>,
    zone_hints: Vec<&'a str>,
    node_hints: Vec<&'a str>,
}

/// Where traffic stays, by the endpoints' hints (kube-proxy's topology mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Topology {
    Anywhere,
    SameNode,
    SameZone,
}

/// kube-proxy's `topologyModeFromHints`: same node when every ready
/// endpoint has node hints and one is for this node; else same zone when
/// every ready endpoint has zone hints and one is for this node's zone.
pub(super) fn topology(endpoints: &[Endpoint], policy: &Policy) -> Topology {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
    let hinted_for = |hints: &[&[&str]], target: Option<&str>| {
        hints.iter().all(|h| !h.is_empty())
            && hints.iter().any(|h| target.is_some_and(|t| h.contains(&t)))
    };
    let node_hints: Vec<&[&str]> = ready.iter().map(|e| e.node_hints.as_slice()).collect();
    let zone_hints: Vec<&[&str]> = ready.iter().map(|e| e.zone_hints.as_slice()).collect();
    if hinted_for(&node_hints, policy.node.as_deref()) {
        Topology::SameNode
    } else if hinted_for(&zone_hints, policy.zone.as_deref()) {
        Topology::SameZone
    } else {
        Topology::Anywhere
    }
}

/// The backends kube-proxy would use from this node (`CategorizeEndpoints`):
/// ready endpoints (on this node only for `local_only`, else those the
/// topology allows), else the serving terminating ones.
pub(super) fn categorize(
    endpoints: &[Endpoint],
    local_only: bool,
    policy: &Policy,
) -> Vec<SocketAddr> {
    let node = policy.node.as_deref();
    let chosen: Vec<&Endpoint> = if local_only {
        let local: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| node.is_some() && e.node == node)
            .collect();
        let ready: Vec<&Endpoint> = local.iter().copied().filter(|e| e.ready).collect();
        if ready.is_empty() {
            local
                .into_iter()
                .filter(|e| e.serving && e.terminating)
                .collect()
        } else {
            ready
        }
    } else {
        let topology = topology(endpoints, policy);
        let available = |e: &Endpoint| match topology {
            Topology::Anywhere => true,
            Topology::SameNode => node.is_some_and(|n| e.node_hints.contains(&n)),
            Topology::SameZone => policy
                .zone
                .as_deref()
                .is_some_and(|z| e.zone_hints.contains(&z)),
        };
        let ready: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| e.ready && available(e))
            .collect();
        if ready.is_empty() {
            // No ready endpoint anywhere (topology never empties the set).
            endpoints
                .iter()
                .filter(|e| e.serving && e.terminating)
                .collect()
        } else {
            ready
        }
    };
    let backends: BTreeSet<SocketAddr> = chosen.into_iter().map(|e| e.backend).collect();
    backends.into_iter().collect()
}

/// The endpoints for one VIP family and service port.
pub(super) fn endpoints<'a>(
    slices: Option<&'a Vec<TrimmedSlice>>,
    vip: &IpAddr,
    port_name: &str,
    protocol: Protocol,
) -> Vec<Endpoint<'a>> {
    let family = Family::of(vip);
    let protocol = protocol.to_string();
    let mut found = Vec::new();
    for slice in slices.into_iter().flatten() {
        if slice.family != Some(family) {
            continue;
        }
        let Some(target) = slice
            .ports
            .iter()
            .find(|p| p.name == port_name && p.protocol == protocol)
        else {
            continue;
        };
        let Some(target_port) = target
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            found.push(Endpoint {
                backend: SocketAddr::new(endpoint.address.to_canonical(), target_port),
                ready: endpoint.ready,
                serving: endpoint.serving,
                terminating: endpoint.terminating,
                node: endpoint.node.as_deref(),
                zone_hints: endpoint.zone_hints.iter().map(String::as_str).collect(),
                node_hints: endpoint.node_hints.iter().map(String::as_str).collect(),
            });
        }
    }
    found
}
