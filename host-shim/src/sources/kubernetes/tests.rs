//! Translation as kube-proxy would program it, case by case.

use serde_json::{Value, json};

use slog::Logger;
use socklb_table::Service;

use super::*;

fn log() -> Logger {
    Logger::root(slog::Discard, slog::o!())
}

fn service(name: &str, spec: Value) -> core::Service {
    serde_json::from_value(
        json!({"metadata": {"namespace": "default", "name": name}, "spec": spec}),
    )
    .unwrap()
}

fn slice(
    name: &str,
    service: &str,
    family: &str,
    ports: Value,
    endpoints: Value,
) -> discovery::EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": name,
                     "labels": {SERVICE_NAME_LABEL: service}},
        "addressType": family, "ports": ports, "endpoints": endpoints,
    }))
    .unwrap()
}

fn ready(ip: &str) -> Value {
    json!({"addresses": [ip], "conditions": {"ready": true}})
}

fn key(name: &str) -> ObjectKey {
    ObjectKey {
        namespace: "default".into(),
        name: name.into(),
    }
}

fn lines(services: &[Service]) -> Vec<String> {
    services.iter().map(ToString::to_string).collect()
}

fn translate(cluster: &Cluster, name: &str, policy: &Policy) -> Vec<String> {
    lines(&cluster.translate(&key(name), policy, &log()).services)
}

#[test]
fn dual_stack_ports_protocols_and_named_target_ports() {
    let mut cluster = Cluster::default();
    cluster.apply_service(service(
        "web",
        json!({
            "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00:96::20"],
            "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
                {"name": "sctp", "port": 9, "protocol": "SCTP"}
            ]
        }),
    ));
    // The named port resolves to 8080 on one slice and 8081 on another.
    cluster.apply_slice(slice(
        "web-a",
        "web",
        "IPv4",
        json!([{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
        json!([ready("10.244.1.1")]),
    ));
    cluster.apply_slice(slice(
        "web-b",
        "web",
        "IPv4",
        json!([{"name": "http", "port": 8081}]),
        json!([ready("10.244.1.2"), ready("10.244.1.1")]),
    ));
    cluster.apply_slice(slice(
        "web-6",
        "web",
        "IPv6",
        json!([{"name": "http", "port": 8080}]),
        json!([ready("fd00:244::1")]),
    ));
    assert_eq!(
        translate(&cluster, "web", &Policy::default()),
        [
            "10.96.0.20:80/TCP -> [10.244.1.1:8080 10.244.1.1:8081 10.244.1.2:8081]",
            "[fd00:96::20]:80/TCP -> [[fd00:244::1]:8080]",
            "10.96.0.20:53/UDP -> [10.244.1.1:5353]",
            "[fd00:96::20]:53/UDP -> []",
        ]
    );
}

#[test]
fn ready_endpoints_first_then_serving_terminating_ones() {
    let mut cluster = Cluster::default();
    cluster.apply_service(service(
        "web",
        json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80}]}),
    ));
    let endpoints = json!([
        {"addresses": ["10.244.1.1"], "conditions": {"ready": false, "serving": true, "terminating": true}},
        {"addresses": ["10.244.1.2"], "conditions": {"ready": false, "serving": false, "terminating": true}},
        {"addresses": ["10.244.1.3"], "conditions": {"ready": false}},
        {"addresses": ["10.244.1.4"]}
    ]);
    cluster.apply_slice(slice(
        "s",
        "web",
        "IPv4",
        json!([{"port": 8080}]),
        endpoints.clone(),
    ));
    // A missing ready condition means ready.
    assert_eq!(
        translate(&cluster, "web", &Policy::default()),
        ["10.96.0.20:80/TCP -> [10.244.1.4:8080]"]
    );
    let mut without_ready = endpoints.as_array().unwrap().clone();
    without_ready.pop();
    cluster.apply_slice(slice(
        "s",
        "web",
        "IPv4",
        json!([{"port": 8080}]),
        Value::Array(without_ready),
    ));
    assert_eq!(
        translate(&cluster, "web", &Policy::default()),
        ["10.96.0.20:80/TCP -> [10.244.1.1:8080]"]
    );
}

#[test]
fn skipped_kinds_affinity_local_policy_and_external_vips() {
    let mut cluster = Cluster::default();
    cluster.apply_service(service(
        "headless",
        json!({"clusterIP": "None", "ports": [{"port": 80}]}),
    ));
    cluster.apply_service(service(
        "ext",
        json!({"type": "ExternalName", "externalName": "x.example"}),
    ));
    cluster.apply_service(service(
        "sticky",
        json!({
        "clusterIP": "10.96.0.30", "ports": [{"port": 80}], "sessionAffinity": "ClientIP"}),
    ));
    cluster.apply_service(service(
        "sticky-30",
        json!({
        "clusterIP": "10.96.0.31", "ports": [{"port": 80}], "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 30}}}),
    ));
    cluster.apply_service(service(
        "local",
        json!({
        "clusterIP": "10.96.0.40", "ports": [{"port": 80}], "internalTrafficPolicy": "Local"}),
    ));
    let mut lb: core::Service = service(
        "lb",
        json!({
        "type": "LoadBalancer", "clusterIP": "10.96.0.50", "externalIPs": ["192.0.2.10"],
        "ports": [{"port": 443}]}),
    );
    lb.status = serde_json::from_value(
        json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}, {"hostname": "lb.example"}]}}),
    )
    .unwrap();
    cluster.apply_service(lb);
    cluster.apply_slice(slice(
        "local-1",
        "local",
        "IPv4",
        json!([{"port": 8080}]),
        json!([
            {"addresses": ["10.244.1.1"], "nodeName": "node-a"},
            {"addresses": ["10.244.2.1"], "nodeName": "node-b"}
        ]),
    ));
    let policy = Policy {
        node: Some("node-b".into()),
        ..Policy::default()
    };
    assert!(translate(&cluster, "headless", &policy).is_empty());
    assert!(translate(&cluster, "ext", &policy).is_empty());
    assert_eq!(
        translate(&cluster, "sticky", &policy),
        ["10.96.0.30:80/TCP -> [] affinity 10800"]
    );
    assert_eq!(
        translate(&cluster, "sticky-30", &policy),
        ["10.96.0.31:80/TCP -> [] affinity 30"]
    );
    assert_eq!(
        translate(&cluster, "local", &policy),
        ["10.96.0.40:80/TCP -> [10.244.2.1:8080]"]
    );
    assert_eq!(
        translate(&cluster, "local", &Policy::default()),
        ["10.96.0.40:80/TCP -> []"]
    );
    assert_eq!(
        translate(&cluster, "lb", &policy),
        ["10.96.0.50:443/TCP -> []"]
    );
    let external = Policy {
        external_vips: true,
        ..policy
    };
    assert_eq!(
        translate(&cluster, "lb", &external),
        [
            "10.96.0.50:443/TCP -> []",
            "192.0.2.10:443/TCP -> [] external",
            "198.51.100.7:443/TCP -> [] external",
        ]
    );
}

#[test]
fn any_order_and_slices_that_change_service() {
    let web = || {
        service(
            "web",
            json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80}]}),
        )
    };
    let web_slice = || {
        slice(
            "s",
            "web",
            "IPv4",
            json!([{"port": 8080}]),
            json!([ready("10.244.1.1")]),
        )
    };
    let mut slices_first = Cluster::default();
    slices_first.apply_slice(web_slice());
    slices_first.apply_service(web());
    let mut services_first = Cluster::default();
    services_first.apply_service(web());
    services_first.apply_slice(web_slice());
    let expected = ["10.96.0.20:80/TCP -> [10.244.1.1:8080]"];
    assert_eq!(
        translate(&slices_first, "web", &Policy::default()),
        expected
    );
    assert_eq!(
        translate(&services_first, "web", &Policy::default()),
        expected
    );
    // Relabelled to another service: it leaves the first one.
    let dirty = services_first.apply_slice(slice(
        "s",
        "api",
        "IPv4",
        json!([{"port": 8080}]),
        json!([ready("10.244.1.1")]),
    ));
    assert_eq!(dirty, [key("web"), key("api")]);
    assert_eq!(
        translate(&services_first, "web", &Policy::default()),
        ["10.96.0.20:80/TCP -> []"]
    );
}

#[test]
fn plans_send_only_what_changed() {
    let log = log();
    let policy = Policy::default();
    let mut cluster = Cluster::default();
    cluster.apply_service(service(
        "web",
        json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80}, {"name": "b", "port": 81}]}),
    ));
    cluster.apply_service(service(
        "api",
        json!({"clusterIP": "10.96.0.21", "ports": [{"port": 80}]}),
    ));
    let mut translation = Translation::default();
    assert_eq!(translation.full(&cluster, &policy, &log).len(), 3);

    let dirty = cluster.apply_slice(slice(
        "s",
        "web",
        "IPv4",
        json!([{"port": 8080}]),
        json!([ready("10.244.1.1")]),
    ));
    let plan = translation.plan(&cluster, dirty, &policy, &log);
    assert_eq!(
        lines(&plan.upserts),
        ["10.96.0.20:80/TCP -> [10.244.1.1:8080]"]
    );
    assert!(plan.deletes.is_empty());
    translation.commit(plan);
    assert!(
        translation
            .plan(&cluster, [key("web"), key("api")], &policy, &log)
            .is_empty()
    );

    let dirty = cluster.delete_service(&service("web", json!({})));
    let plan = translation.plan(&cluster, dirty, &policy, &log);
    assert!(plan.upserts.is_empty());
    assert_eq!(plan.deletes.len(), 2);
}

#[test]
fn a_vip_claimed_twice_stays_with_its_first_owner() {
    let log = log();
    let policy = Policy {
        external_vips: true,
        ..Policy::default()
    };
    let mut cluster = Cluster::default();
    cluster.apply_service(service(
        "a",
        json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80}]}),
    ));
    let mut translation = Translation::default();
    translation.full(&cluster, &policy, &log);
    let dirty = cluster.apply_service(service(
        "b",
        json!({
        "clusterIP": "10.96.0.21", "externalIPs": ["10.96.0.20"], "ports": [{"port": 80}]}),
    ));
    let plan = translation.plan(&cluster, dirty, &policy, &log);
    assert_eq!(lines(&plan.upserts), ["10.96.0.21:80/TCP -> []"]);
    translation.commit(plan);
    // While "a" changes but keeps the VIP, "b" waits.
    let dirty = cluster.apply_slice(slice(
        "a",
        "a",
        "IPv4",
        json!([{"port": 8080}]),
        json!([ready("10.244.1.1")]),
    ));
    let plan = translation.plan(&cluster, dirty, &policy, &log);
    assert_eq!(
        lines(&plan.upserts),
        ["10.96.0.20:80/TCP -> [10.244.1.1:8080]"]
    );
    translation.commit(plan);
    // Once "a" lets go, "b" gets the VIP without an event of its own.
    let dirty = cluster.delete_service(&service("a", json!({})));
    assert_eq!(dirty, [key("a")]);
    let plan = translation.plan(&cluster, dirty, &policy, &log);
    assert_eq!(lines(&plan.upserts), ["10.96.0.20:80/TCP -> [] external"]);
    assert!(
        plan.deletes.is_empty(),
        "the VIP moves, it is not removed: {plan:?}"
    );
    translation.commit(plan);
    assert!(
        translation
            .plan(&cluster, [key("a"), key("b")], &policy, &log)
            .is_empty()
    );
}

#[test]
fn an_owner_recomputed_with_its_rival_keeps_the_vip() {
    let log = log();
    let policy = Policy {
        external_vips: true,
        ..Policy::default()
    };
    let mut cluster = Cluster::default();
    // "z" owns the VIP; "a" sorts first and claims it too.
    cluster.apply_service(service(
        "z",
        json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80}]}),
    ));
    let mut translation = Translation::default();
    translation.full(&cluster, &policy, &log);
    cluster.apply_service(service(
        "a",
        json!({"clusterIP": "10.96.0.21", "externalIPs": ["10.96.0.20"], "ports": [{"port": 80}]}),
    ));
    let plan = translation.plan(&cluster, [key("a"), key("z")], &policy, &log);
    assert_eq!(lines(&plan.upserts), ["10.96.0.21:80/TCP -> []"]);
    assert!(plan.deletes.is_empty(), "{plan:?}");
}

#[test]
fn services_of_another_proxy_and_proxied_load_balancers_are_not_ours() {
    let mut cluster = Cluster::default();
    let mut other: core::Service = service(
        "other",
        json!({"clusterIP": "10.96.0.60", "ports": [{"port": 80}]}),
    );
    other.metadata.labels = Some(
        [(
            SERVICE_PROXY_NAME_LABEL.to_string(),
            "other-proxy".to_string(),
        )]
        .into(),
    );
    cluster.apply_service(other);
    let mut lb: core::Service = service(
        "lb",
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.50", "ports": [{"port": 443}]}),
    );
    lb.status = serde_json::from_value(json!({"loadBalancer": {"ingress": [
        {"ip": "198.51.100.7", "ipMode": "VIP"},
        {"ip": "198.51.100.8", "ipMode": "Proxy"},
        {"ip": "198.51.100.9"}
    ]}}))
    .unwrap();
    cluster.apply_service(lb);
    let policy = Policy {
        external_vips: true,
        ..Policy::default()
    };
    assert!(translate(&cluster, "other", &policy).is_empty());
    assert_eq!(
        translate(&cluster, "lb", &policy),
        [
            "10.96.0.50:443/TCP -> []",
            "198.51.100.7:443/TCP -> [] external",
            "198.51.100.9:443/TCP -> [] external",
        ]
    );
}

#[test]
fn a_ready_terminating_endpoint_counts_as_ready() {
    let mut cluster = Cluster::default();
    cluster.apply_service(service(
        "web",
        json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80}]}),
    ));
    cluster.apply_slice(slice(
        "s",
        "web",
        "IPv4",
        json!([{"port": 8080}]),
        json!([
            {"addresses": ["10.244.1.1"], "conditions": {"ready": true, "serving": true, "terminating": true}},
            {"addresses": ["10.244.1.2"], "conditions": {"ready": false, "serving": true, "terminating": true}}
        ]),
    ));
    assert_eq!(
        translate(&cluster, "web", &Policy::default()),
        ["10.96.0.20:80/TCP -> [10.244.1.1:8080]"]
    );
}

/// A ready endpoint with topology hints, as the EndpointSlice controller
/// writes them for the service's trafficDistribution.
fn hinted(ip: &str, node: &str, zones: &[&str], nodes: &[&str]) -> Value {
    let mut hints = serde_json::Map::new();
    if !zones.is_empty() {
        hints.insert(
            "forZones".into(),
            zones.iter().map(|z| json!({"name": z})).collect(),
        );
    }
    if !nodes.is_empty() {
        hints.insert(
            "forNodes".into(),
            nodes.iter().map(|n| json!({"name": n})).collect(),
        );
    }
    json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": true},
           "hints": hints})
}

fn topology_cluster(endpoints: Value) -> Cluster {
    let mut cluster = Cluster::default();
    cluster.apply_service(service(
        "web",
        json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80}],
               "trafficDistribution": "PreferClose"}),
    ));
    cluster.apply_slice(slice(
        "s",
        "web",
        "IPv4",
        json!([{"port": 8080}]),
        endpoints,
    ));
    cluster
}

fn on(node: &str, zone: Option<&str>) -> Policy {
    Policy {
        node: Some(node.into()),
        zone: zone.map(Into::into),
        ..Policy::default()
    }
}

#[test]
fn zone_hints_keep_traffic_in_the_zone_when_kube_proxy_would() {
    // PreferClose and PreferSameZone: the controller hints every
    // endpoint for its own zone.
    let cluster = topology_cluster(json!([
        hinted("10.244.1.1", "node-a", &["zone-a"], &[]),
        hinted("10.244.1.2", "node-b", &["zone-b"], &[]),
        hinted("10.244.1.3", "node-c", &["zone-a"], &[])
    ]));
    let all = ["10.96.0.20:80/TCP -> [10.244.1.1:8080 10.244.1.2:8080 10.244.1.3:8080]"];
    assert_eq!(
        translate(&cluster, "web", &on("node-x", Some("zone-a"))),
        ["10.96.0.20:80/TCP -> [10.244.1.1:8080 10.244.1.3:8080]"]
    );
    assert_eq!(
        translate(&cluster, "web", &on("node-x", Some("zone-b"))),
        ["10.96.0.20:80/TCP -> [10.244.1.2:8080]"]
    );
    // No zone label on the node, or no endpoint hinted for its zone:
    // the hints are ignored.
    assert_eq!(translate(&cluster, "web", &on("node-x", None)), all);
    assert_eq!(
        translate(&cluster, "web", &on("node-x", Some("zone-c"))),
        all
    );

    // One ready endpoint without hints: ignored too; a not-ready one
    // does not count.
    let cluster = topology_cluster(json!([
        hinted("10.244.1.1", "node-a", &["zone-a"], &[]),
        {"addresses": ["10.244.1.2"], "conditions": {"ready": true}}
    ]));
    assert_eq!(
        translate(&cluster, "web", &on("node-x", Some("zone-a"))),
        ["10.96.0.20:80/TCP -> [10.244.1.1:8080 10.244.1.2:8080]"]
    );
    let cluster = topology_cluster(json!([
        hinted("10.244.1.1", "node-a", &["zone-a"], &[]),
        {"addresses": ["10.244.1.2"], "conditions": {"ready": false}}
    ]));
    assert_eq!(
        translate(&cluster, "web", &on("node-x", Some("zone-a"))),
        ["10.96.0.20:80/TCP -> [10.244.1.1:8080]"]
    );
}

#[test]
fn node_hints_keep_traffic_on_the_node_before_zone_hints() {
    // PreferSameNode: node hints, and zone hints as the fallback.
    let cluster = topology_cluster(json!([
        hinted("10.244.1.1", "node-a", &["zone-a"], &["node-a"]),
        hinted("10.244.1.2", "node-b", &["zone-a"], &["node-b"]),
        hinted("10.244.1.3", "node-c", &["zone-b"], &["node-c"])
    ]));
    assert_eq!(
        translate(&cluster, "web", &on("node-b", Some("zone-a"))),
        ["10.96.0.20:80/TCP -> [10.244.1.2:8080]"]
    );
    // No endpoint on this node: the zone's.
    assert_eq!(
        translate(&cluster, "web", &on("node-x", Some("zone-a"))),
        ["10.96.0.20:80/TCP -> [10.244.1.1:8080 10.244.1.2:8080]"]
    );
}

#[test]
fn serving_terminating_fallback_and_local_policy_ignore_hints() {
    // No ready endpoint: the serving terminating ones, wherever hinted.
    let cluster = topology_cluster(json!([
        {"addresses": ["10.244.1.1"], "nodeName": "node-a",
         "conditions": {"ready": false, "serving": true, "terminating": true},
         "hints": {"forZones": [{"name": "zone-b"}]}}
    ]));
    assert_eq!(
        translate(&cluster, "web", &on("node-a", Some("zone-a"))),
        ["10.96.0.20:80/TCP -> [10.244.1.1:8080]"]
    );

    // internalTrafficPolicy Local: this node's ready endpoints, else its
    // serving terminating ones; hints play no part. External VIPs take
    // the cluster's endpoints.
    let mut cluster = Cluster::default();
    cluster.apply_service(service(
        "local",
        json!({"clusterIP": "10.96.0.40", "externalIPs": ["192.0.2.40"],
               "ports": [{"port": 80}], "internalTrafficPolicy": "Local"}),
    ));
    let terminating_here = json!({"addresses": ["10.244.1.3"], "nodeName": "node-a",
        "conditions": {"ready": false, "serving": true, "terminating": true}});
    cluster.apply_slice(slice(
        "s",
        "local",
        "IPv4",
        json!([{"port": 8080}]),
        json!([
            hinted("10.244.1.1", "node-a", &["zone-b"], &[]),
            hinted("10.244.1.2", "node-b", &["zone-a"], &[]),
            terminating_here.clone()
        ]),
    ));
    let policy = Policy {
        external_vips: true,
        ..on("node-a", Some("zone-a"))
    };
    assert_eq!(
        translate(&cluster, "local", &policy),
        [
            "10.96.0.40:80/TCP -> [10.244.1.1:8080]",
            "192.0.2.40:80/TCP -> [10.244.1.2:8080] external",
        ]
    );
    cluster.apply_slice(slice(
        "s",
        "local",
        "IPv4",
        json!([{"port": 8080}]),
        json!([hinted("10.244.1.2", "node-b", &[], &[]), terminating_here]),
    ));
    assert_eq!(
        translate(&cluster, "local", &policy)[0],
        "10.96.0.40:80/TCP -> [10.244.1.3:8080]"
    );
}

#[test]
fn an_external_ip_of_the_guests_own_kind_is_skipped_not_the_service() {
    let mut cluster = Cluster::default();
    cluster.apply_service(service(
        "node-local",
        json!({
        "clusterIP": "10.96.0.60", "externalIPs": ["127.0.0.1", "192.0.2.60"],
        "ports": [{"port": 80}]}),
    ));
    let policy = Policy {
        external_vips: true,
        ..Policy::default()
    };
    assert_eq!(
        translate(&cluster, "node-local", &policy),
        [
            "10.96.0.60:80/TCP -> []",
            "192.0.2.60:80/TCP -> [] external"
        ]
    );
}
