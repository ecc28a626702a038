//! The agent's service table: validated writes to the maps (and why one is
//! refused or fails: [`WriteError`]), the names people gave services (the
//! maps keep none) and the generation the host last synced; the kernel
//! datapath beside them when there is one; and the staging of a Sync that
//! arrives in parts.

use std::{collections::BTreeMap, sync::Arc};

use anyhow::{Context as _, Result};
use socklb_protocols::socklb as api;
use socklb_table::{Service, ServiceKey, Table, TableError};

use crate::{
    datapath::{Datapath, ProgrammedTable},
    opt_out::OptOutError,
    sockets::{Removals, SocketCloser},
};

pub struct ServiceTable {
    programmed: ProgrammedTable,
    /// The programs and their attachment; none for a table kept in memory
    /// (see `datapath::TableMaps::in_memory`).
    datapath: Option<Datapath>,
    names: BTreeMap<ServiceKey, String>,
    generation: u64,
    socket_closer: Option<Arc<SocketCloser>>,
    /// Whether a backend may be a loopback address (see
    /// [`refuse_loopback_backends`]).
    allow_loopback_backends: bool,
}

/// Refuses a backend on a loopback address (127.0.0.0/8, ::1): the VIP's
/// connections would go to a port of the guest itself, so a table could
/// hand a service's traffic to any local process. A node-local proxy that
/// wants exactly that runs the agent with `--allow-loopback-backends`.
pub fn refuse_loopback_backends(services: &[Service]) -> Result<(), TableError> {
    for service in services {
        if let Some((index, backend)) = service
            .backends
            .iter()
            .enumerate()
            .find(|(_, backend)| backend.ip().to_canonical().is_loopback())
        {
            return Err(TableError::Field {
                service: service.label(),
                field: format!("backends[{index}].ip"),
                message: format!(
                    "{} is a loopback address: the service's connections would go to a port \
                     of the guest itself (start the agent with --allow-loopback-backends for a \
                     node-local proxy)",
                    backend.ip()
                ),
            });
        }
    }
    Ok(())
}

/// The outcome of a write.
#[derive(Debug, PartialEq, Eq)]
pub struct Written {
    pub generation: u64,
    pub services: usize,
    /// The digest of the table read back from the maps (Sync only: reading
    /// every service back would make each incremental write O(table)).
    pub digest: Option<String>,
}

/// Why a write (a table, services, keys, the opt-out list) did not happen
/// or did not finish. Every variant but `Failed` is a refusal before
/// anything changed; the API answers each with its own code.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// An invalid request, a table past the datapath's capacity, or a key
    /// that is not programmed.
    #[error(transparent)]
    Table(#[from] TableError),
    #[error(
        "the write expects the table at generation {expected}, it is at {current}: \
         the client's view is stale (sync, or list, and write again)"
    )]
    StaleGeneration { expected: u64, current: u64 },
    #[error(transparent)]
    OptOut(#[from] OptOutError),
    /// A map operation failed, possibly half way (a whole table is then
    /// written back: see `ProgrammedTable::apply`).
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl ServiceTable {
    /// A table over `programmed`'s maps, with no kernel datapath beside it
    /// until [`ServiceTable::with_datapath`].
    pub fn new(programmed: ProgrammedTable) -> ServiceTable {
        ServiceTable {
            programmed,
            datapath: None,
            names: BTreeMap::new(),
            generation: 0,
            socket_closer: None,
            allow_loopback_backends: false,
        }
    }

    /// Takes backends on loopback addresses (a node-local proxy).
    pub fn allowing_loopback_backends(mut self, allow: bool) -> ServiceTable {
        self.allow_loopback_backends = allow;
        self
    }

    fn check_backends(&self, services: &[Service]) -> Result<(), WriteError> {
        if !self.allow_loopback_backends {
            refuse_loopback_backends(services)?;
        }
        Ok(())
    }

    /// The programs whose maps `programmed` are.
    pub fn with_datapath(mut self, datapath: Datapath) -> ServiceTable {
        self.datapath = Some(datapath);
        self
    }

    /// Closes the sockets of the backends each later write removes.
    pub fn set_socket_closer(&mut self, closer: Arc<SocketCloser>) {
        self.socket_closer = Some(closer);
    }

    /// Closes the sockets of `removals` before the write is acknowledged, and
    /// with the table held, so a later write cannot add a backend back in
    /// between and lose its fresh sockets.
    fn close_sockets_of(&self, removals: Removals) {
        if let Some(closer) = &self.socket_closer
            && !removals.dropped.is_empty()
        {
            let opted_out = self
                .datapath
                .as_ref()
                .and_then(|d| d.opt_out_cgroups().ok())
                .unwrap_or_default();
            closer.close(removals, &opted_out);
        }
    }

    /// Makes the datapath hold exactly `table`, or leaves it as it was
    /// (`ProgrammedTable::apply` is all or nothing), and answers the digest
    /// of `table`: once applied, that is what the maps hold, and reading
    /// them back would cost as many lookups again (Digest and List read
    /// them).
    pub fn sync(&mut self, table: &Table, generation: u64) -> Result<Written, WriteError> {
        self.check_backends(&table.services)?;
        let summary = self.programmed.apply(table)?;
        self.close_sockets_of(summary.removals);
        self.names = table
            .services
            .iter()
            .filter_map(|s| Some((s.key, s.name.clone()?)))
            .collect();
        self.generation = generation;
        Ok(Written {
            generation,
            services: self.programmed.service_count(),
            digest: Some(table.digest()),
        })
    }

    /// Refuses a write that expects another generation (0: not checked).
    pub fn check_generation(&self, expected: u64) -> Result<(), WriteError> {
        if expected != 0 && expected != self.generation {
            return Err(WriteError::StaleGeneration {
                expected,
                current: self.generation,
            });
        }
        Ok(())
    }

    pub fn upsert(&mut self, services: &[Service]) -> Result<Written, WriteError> {
        self.check_backends(services)?;
        let summary = self.programmed.upsert(services)?;
        self.close_sockets_of(summary.removals);
        for service in services {
            match &service.name {
                Some(name) => self.names.insert(service.key, name.clone()),
                None => self.names.remove(&service.key),
            };
        }
        Ok(self.bumped())
    }

    pub fn delete(&mut self, keys: &[ServiceKey]) -> Result<Written, WriteError> {
        let summary = self.programmed.delete(keys)?;
        self.close_sockets_of(summary.removals);
        for key in keys {
            self.names.remove(key);
        }
        Ok(self.bumped())
    }

    fn bumped(&mut self) -> Written {
        self.generation += 1;
        Written {
            generation: self.generation,
            services: self.programmed.service_count(),
            digest: None,
        }
    }

    /// The generation and the table as read back from the maps, with names.
    pub fn list(&self) -> Result<(u64, Table)> {
        let mut table = self.programmed.read_table()?;
        for service in &mut table.services {
            service.name = self.names.get(&service.key).cloned();
        }
        Ok((self.generation, table))
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The maps' side: counters and usage.
    pub fn programmed(&self) -> &ProgrammedTable {
        &self.programmed
    }

    /// Attaches the programs to `cgroup` (see `Datapath::attach`).
    pub fn attach(&mut self, cgroup: &std::path::Path) -> Result<()> {
        self.datapath
            .as_mut()
            .context("a table kept in memory has no programs to attach")?
            .attach(cgroup)
    }

    pub fn datapath(&self) -> Option<&Datapath> {
        self.datapath.as_ref()
    }

    pub fn datapath_mut(&mut self) -> Option<&mut Datapath> {
        self.datapath.as_mut()
    }
}

/// Why a Sync in parts was refused. Any refusal drops what was staged.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error(
        "sync {id} is not in progress (a newer SyncBegin replaced it, it failed, or the agent restarted)"
    )]
    NotInProgress { id: u64 },
    #[error("sync {id}: part {got} arrived, part {expected} was next")]
    OutOfOrder { id: u64, got: u32, expected: u32 },
    #[error("sync {id}: the parts carry {what} {got}, SyncBegin announced {announced}")]
    Count {
        id: u64,
        what: &'static str,
        got: usize,
        announced: usize,
    },
    #[error("sync {id}: the parts carried a table of digest {got}, the commit expects {expected}")]
    Digest {
        id: u64,
        got: String,
        expected: String,
    },
    #[error(transparent)]
    Table(#[from] TableError),
}

/// A Sync arriving in parts: validated part by part and held in memory;
/// nothing touches the datapath until `finish` hands over the whole table.
#[derive(Debug)]
pub struct StagedSync {
    pub id: u64,
    pub generation: u64,
    announced_services: usize,
    announced_backends: usize,
    next_part: u32,
    backends: usize,
    services: Vec<Service>,
}

impl StagedSync {
    /// Refuses at once a table larger than the datapath holds, before any
    /// part is sent.
    pub fn begin(
        id: u64,
        generation: u64,
        services: usize,
        backends: usize,
    ) -> Result<StagedSync, StagingError> {
        socklb_table::check_capacity(services, backends)?;
        Ok(StagedSync {
            id,
            generation,
            announced_services: services,
            announced_backends: backends,
            next_part: 0,
            backends: 0,
            services: Vec::with_capacity(services),
        })
    }

    /// Validates and stages part `index`; returns the services staged.
    pub fn add_part(&mut self, index: u32, part: &[api::Service]) -> Result<usize, StagingError> {
        if index != self.next_part {
            return Err(StagingError::OutOfOrder {
                id: self.id,
                got: index,
                expected: self.next_part,
            });
        }
        let first = self.services.len();
        for (offset, service) in part.iter().enumerate() {
            let service = Service::from_api(first + offset, service)?;
            self.backends += service.backends.len();
            self.services.push(service);
        }
        self.check_not_above_announced()?;
        self.next_part += 1;
        Ok(self.services.len())
    }

    fn check_not_above_announced(&self) -> Result<(), StagingError> {
        for (what, got, announced) in [
            ("services", self.services.len(), self.announced_services),
            ("backends", self.backends, self.announced_backends),
        ] {
            if got > announced {
                return Err(StagingError::Count {
                    id: self.id,
                    what,
                    got,
                    announced,
                });
            }
        }
        Ok(())
    }

    /// The whole table, validated across parts (unique keys) and equal to
    /// what the host meant to send (`digest`).
    pub fn finish(self, digest: &str) -> Result<Table, StagingError> {
        for (what, got, announced) in [
            ("services", self.services.len(), self.announced_services),
            ("backends", self.backends, self.announced_backends),
        ] {
            if got != announced {
                return Err(StagingError::Count {
                    id: self.id,
                    what,
                    got,
                    announced,
                });
            }
        }
        let table = Table::new(self.services)?;
        let got = table.digest();
        if got != digest {
            return Err(StagingError::Digest {
                id: self.id,
                got,
                expected: digest.into(),
            });
        }
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{TableMaps, WriteFaults};

    #[test]
    fn loopback_backends_are_refused_before_the_maps_unless_allowed() {
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let table = Table::parse(
            r#"{"services": [{"vip": "10.96.0.20", "port": 80,
                "backends": [{"ip": "::ffff:127.0.0.1", "port": 15001}]}]}"#,
        )
        .unwrap();
        let maps =
            || ProgrammedTable::adopt(TableMaps::in_memory(WriteFaults::default()), &log).unwrap();
        let mut refusing = ServiceTable::new(maps());
        for result in [refusing.sync(&table, 1), refusing.upsert(&table.services)] {
            let err = result.unwrap_err();
            assert!(
                matches!(&err, WriteError::Table(TableError::Field { field, .. }) if field == "backends[0].ip"),
                "{err}"
            );
        }
        assert_eq!(refusing.programmed().service_count(), 0, "nothing written");
        let mut allowing = ServiceTable::new(maps()).allowing_loopback_backends(true);
        allowing.sync(&table, 1).unwrap();
        assert_eq!(allowing.programmed().service_count(), 1);
    }

    fn part(services: &[(&str, u32, &[&str])]) -> Vec<api::Service> {
        let table = Table::parse(
            &serde_json::json!({
                "services": services.iter().map(|(vip, port, backends)| serde_json::json!({
                    "vip": vip, "port": port,
                    "backends": backends.iter().map(|ip| serde_json::json!({"ip": ip, "port": 8080}))
                        .collect::<Vec<_>>(),
                })).collect::<Vec<_>>()
            })
            .to_string(),
        )
        .unwrap();
        table.to_api()
    }

    #[test]
    fn parts_make_the_whole_table() {
        let first = part(&[("10.96.0.1", 80, &["10.244.1.1", "10.244.1.2"])]);
        let second = part(&[("10.96.0.2", 53, &[]), ("fd00::1", 80, &["fd00:1::1"])]);
        let whole = Table::from_api(&[first.clone(), second.clone()].concat()).unwrap();
        let mut staged = StagedSync::begin(1, 7, 3, 3).unwrap();
        assert_eq!(staged.add_part(0, &first).unwrap(), 1);
        assert_eq!(staged.add_part(1, &second).unwrap(), 3);
        assert_eq!(staged.finish(&whole.digest()).unwrap(), whole);
    }

    #[test]
    fn a_table_beyond_capacity_is_refused_at_begin() {
        let err = StagedSync::begin(1, 1, 65_537, 0).unwrap_err();
        assert!(
            matches!(err, StagingError::Table(TableError::Capacity { .. })),
            "{err}"
        );
        assert!(StagedSync::begin(1, 1, 1, 262_145).is_err());
    }

    #[test]
    fn lost_repeated_or_surplus_parts_are_refused() {
        let one = part(&[("10.96.0.1", 80, &["10.244.1.1"])]);
        let two = part(&[("10.96.0.2", 80, &["10.244.1.1"])]);
        let mut staged = StagedSync::begin(3, 1, 2, 2).unwrap();
        staged.add_part(0, &one).unwrap();
        let err = staged.add_part(0, &one).unwrap_err();
        assert_eq!(err.to_string(), "sync 3: part 0 arrived, part 1 was next");
        let err = staged.add_part(2, &two).unwrap_err();
        assert!(matches!(err, StagingError::OutOfOrder { .. }), "{err}");

        let mut staged = StagedSync::begin(4, 1, 1, 1).unwrap();
        let err = staged
            .add_part(0, &[one.clone(), two.clone()].concat())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "sync 4: the parts carry services 2, SyncBegin announced 1"
        );

        // A missing part shows at the commit.
        let mut staged = StagedSync::begin(5, 1, 2, 2).unwrap();
        staged.add_part(0, &one).unwrap();
        let err = staged.finish("any").unwrap_err();
        assert_eq!(
            err.to_string(),
            "sync 5: the parts carry services 1, SyncBegin announced 2"
        );
    }

    #[test]
    fn duplicates_across_parts_invalid_services_and_another_digest_are_refused() {
        let one = part(&[("10.96.0.1", 80, &["10.244.1.1"])]);
        let mut staged = StagedSync::begin(1, 1, 2, 2).unwrap();
        staged.add_part(0, &one).unwrap();
        staged.add_part(1, &one).unwrap();
        let err = staged.finish("any").unwrap_err();
        assert!(
            err.to_string().contains("10.96.0.1:80/TCP is already used"),
            "{err}"
        );

        let mut bad = one.clone();
        bad[0].backends[0].port = 0;
        let mut staged = StagedSync::begin(1, 1, 2, 2).unwrap();
        staged.add_part(0, &one).unwrap();
        let err = staged.add_part(1, &bad).unwrap_err();
        // Named by its index in the whole table, not in its part.
        assert!(
            err.to_string().contains("services[1]") && err.to_string().contains("port"),
            "{err}"
        );

        let mut staged = StagedSync::begin(1, 1, 1, 1).unwrap();
        staged.add_part(0, &one).unwrap();
        let err = staged.finish(&Table::default().digest()).unwrap_err();
        assert!(matches!(err, StagingError::Digest { .. }), "{err}");
    }
}
