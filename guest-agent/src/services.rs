//! The agent's service table: validated writes to the datapath, the names
//! people gave services (the datapath keeps none) and the generation the
//! host last synced.

use std::collections::BTreeMap;

use anyhow::Result;
use socklb_table::{Service, ServiceKey, Table};

use crate::datapath::Datapath;

pub struct ServiceTable {
    datapath: Datapath,
    names: BTreeMap<ServiceKey, String>,
    generation: u64,
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

impl ServiceTable {
    pub fn new(datapath: Datapath) -> ServiceTable {
        ServiceTable {
            datapath,
            names: BTreeMap::new(),
            generation: 0,
        }
    }

    /// Makes the datapath hold exactly `table`.
    pub fn sync(&mut self, table: &Table, generation: u64) -> Result<Written> {
        self.datapath.apply(table)?;
        self.names = table
            .services
            .iter()
            .filter_map(|s| Some((s.key, s.name.clone()?)))
            .collect();
        self.generation = generation;
        let programmed = self.datapath.read_table()?;
        Ok(Written {
            generation,
            services: programmed.services.len(),
            digest: Some(programmed.digest()),
        })
    }

    pub fn upsert(&mut self, services: &[Service]) -> Result<Written> {
        self.datapath.upsert(services)?;
        for service in services {
            match &service.name {
                Some(name) => self.names.insert(service.key, name.clone()),
                None => self.names.remove(&service.key),
            };
        }
        Ok(self.bumped())
    }

    pub fn delete(&mut self, keys: &[ServiceKey]) -> Result<Written> {
        self.datapath.delete(keys)?;
        for key in keys {
            self.names.remove(key);
        }
        Ok(self.bumped())
    }

    fn bumped(&mut self) -> Written {
        self.generation += 1;
        Written {
            generation: self.generation,
            services: self.datapath.service_count(),
            digest: None,
        }
    }

    /// The generation and the table as read back from the maps, with names.
    pub fn list(&self) -> Result<(u64, Table)> {
        let mut table = self.datapath.read_table()?;
        for service in &mut table.services {
            service.name = self.names.get(&service.key).cloned();
        }
        Ok((self.generation, table))
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.datapath
    }
}
