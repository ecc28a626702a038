//! The incremental translation: what the agent was given per Kubernetes
//! Service, the plan of Upserts and Deletes for a batch of changes, and who
//! owns a VIP:port two services claim.

use std::collections::{BTreeMap, BTreeSet};

use slog::{Logger, warn};
use socklb_table::{Service, ServiceKey, check_capacity};

use super::{Cluster, ObjectKey, Policy};

/// What the agent was given, per Kubernetes Service, so that each batch of
/// changed services becomes Upserts and Deletes of just what changed.
#[derive(Default)]
pub struct Translation {
    applied: BTreeMap<ServiceKey, Service>,
    owners: BTreeMap<ObjectKey, BTreeSet<ServiceKey>>,
    /// The reverse of `owners`: which Kubernetes Service has a VIP:port.
    owner_of: BTreeMap<ServiceKey, ObjectKey>,
    /// Services refused a VIP:port another one owns: recomputed with its
    /// owner, so one of them gets it when the owner lets go.
    waiting: BTreeMap<ServiceKey, BTreeSet<ObjectKey>>,
    /// Translated services the agent was not given: past the datapath's
    /// capacity (see `leave_out`).
    left_out: BTreeSet<ServiceKey>,
    /// Per Kubernetes Service, how many of its socklb services no table
    /// may hold (see `Translated::refused`); none listed when none.
    refused: BTreeMap<ObjectKey, usize>,
}

/// Changes to send, and the state to keep once the agent has them.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub upserts: Vec<Service>,
    pub deletes: Vec<ServiceKey>,
    owners: BTreeMap<ObjectKey, BTreeSet<ServiceKey>>,
    waiting: BTreeMap<ServiceKey, BTreeSet<ObjectKey>>,
    /// `Translated::refused` of each Kubernetes Service planned.
    refused: BTreeMap<ObjectKey, usize>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }
}

impl Translation {
    /// Everything `cluster` translates to; becomes what was applied.
    pub fn full(&mut self, cluster: &Cluster, policy: &Policy, log: &Logger) -> Vec<Service> {
        *self = Translation::default();
        let keys: Vec<ObjectKey> = cluster.service_keys().cloned().collect();
        let plan = self.plan(cluster, keys, policy, log);
        let services = plan.upserts.clone();
        self.count_refused(&plan);
        self.commit(plan);
        services
    }

    /// What to send for the services in `dirty`.
    pub fn plan(
        &self,
        cluster: &Cluster,
        dirty: impl IntoIterator<Item = ObjectKey>,
        policy: &Policy,
        log: &Logger,
    ) -> Plan {
        let mut plan = Plan::default();
        let mut dirty: BTreeSet<ObjectKey> = dirty.into_iter().collect();
        let waiting: Vec<ObjectKey> = dirty
            .iter()
            .filter_map(|key| self.owners.get(key))
            .flatten()
            .filter_map(|vip| self.waiting.get(vip))
            .flatten()
            .cloned()
            .collect();
        dirty.extend(waiting);
        let translated: Vec<(&ObjectKey, Vec<Service>)> = dirty
            .iter()
            .map(|key| {
                let translated = cluster.translate(key, policy, log);
                plan.refused.insert(key.clone(), translated.refused);
                (key, translated.services)
            })
            .collect();
        // An owner keeps what it still claims; others queue behind it.
        let mut claimed: BTreeMap<ServiceKey, &ObjectKey> = BTreeMap::new();
        for (key, services) in &translated {
            if let Some(owned) = self.owners.get(*key) {
                for service in services.iter().filter(|s| owned.contains(&s.key)) {
                    claimed.insert(service.key, *key);
                }
            }
        }
        for (key, services) in translated {
            let previous = self.owners.get(key).cloned().unwrap_or_default();
            let mut owned = BTreeSet::new();
            for service in services {
                // Owners being recomputed count by their new claims only.
                let owner = claimed.get(&service.key).copied().or_else(|| {
                    self.owner_of
                        .get(&service.key)
                        .filter(|owner| !dirty.contains(*owner))
                });
                if owner.is_some_and(|owner| owner != key) {
                    warn!(log, "VIP already served by another service; skipped";
                          "service" => key.to_string(), "vip" => service.key.to_string());
                    plan.waiting
                        .entry(service.key)
                        .or_default()
                        .insert(key.clone());
                    continue;
                }
                owned.insert(service.key);
                claimed.insert(service.key, key);
                if self.applied.get(&service.key) != Some(&service) {
                    plan.upserts.push(service);
                }
            }
            plan.deletes.extend(previous.difference(&owned).copied());
            plan.owners.insert(key.clone(), owned);
        }
        // A VIP that moved to another service is replaced, not removed.
        let upserted: BTreeSet<ServiceKey> = plan.upserts.iter().map(|s| s.key).collect();
        plan.deletes.retain(|key| !upserted.contains(key));
        plan
    }

    /// Records that the services with `keys`, translated by the last
    /// [`Translation::full`], were not given to the agent (they did not fit
    /// its capacity), so a later plan sends them when they change.
    pub fn leave_out(&mut self, keys: &[ServiceKey]) {
        for key in keys {
            self.applied.remove(key);
            self.left_out.insert(*key);
        }
    }

    /// Services left out for capacity since the last full translation.
    pub fn left_out(&self) -> &BTreeSet<ServiceKey> {
        &self.left_out
    }

    /// Socklb services of the cluster no table may hold, as last counted.
    pub fn refused(&self) -> usize {
        self.refused.values().sum()
    }

    /// Whether the agent's table stays within the datapath's capacity
    /// once `plan` is applied.
    pub fn fits(&self, plan: &Plan) -> bool {
        let mut services = self.applied.len();
        let mut backends: usize = self.applied.values().map(|s| s.backends.len()).sum();
        for key in &plan.deletes {
            if let Some(old) = self.applied.get(key) {
                services -= 1;
                backends -= old.backends.len();
            }
        }
        for service in &plan.upserts {
            match self.applied.get(&service.key) {
                Some(old) => backends -= old.backends.len(),
                None => services += 1,
            }
            backends += service.backends.len();
        }
        check_capacity(services, backends).is_ok()
    }

    /// Counts what `plan`'s Kubernetes Services translate to that no
    /// table may hold: a count of the cluster, whether or not the agent
    /// takes the plan (a plan with nothing to send included).
    pub fn count_refused(&mut self, plan: &Plan) {
        for (key, refused) in &plan.refused {
            if *refused == 0 {
                self.refused.remove(key);
            } else {
                self.refused.insert(key.clone(), *refused);
            }
        }
    }

    /// Records a plan the agent acknowledged.
    pub fn commit(&mut self, plan: Plan) {
        for key in &plan.deletes {
            self.applied.remove(key);
        }
        for service in plan.upserts {
            self.applied.insert(service.key, service);
        }
        self.waiting.retain(|_, claimants| {
            claimants.retain(|claimant| !plan.owners.contains_key(claimant));
            !claimants.is_empty()
        });
        for (vip, claimants) in plan.waiting {
            self.waiting.entry(vip).or_default().extend(claimants);
        }
        for (owner, keys) in plan.owners {
            for key in self.owners.remove(&owner).into_iter().flatten() {
                self.owner_of.remove(&key);
            }
            for key in &keys {
                self.owner_of.insert(*key, owner.clone());
            }
            if !keys.is_empty() {
                self.owners.insert(owner, keys);
            }
        }
    }
}
