//! [`MeterRegistry`]: the meters in force, shared by every worker of a process and replaced whole when
//! the definitions change (a poller reloads them from Postgres). A meter applies to the events processed
//! after it is loaded (SPEC §4).

use std::sync::{Arc, RwLock};

use meterflow_model::MeterSet;

#[derive(Clone, Default)]
pub struct MeterRegistry(Arc<RwLock<Arc<MeterSet>>>);

impl MeterRegistry {
    pub fn new(meters: MeterSet) -> Self {
        MeterRegistry(Arc::new(RwLock::new(Arc::new(meters))))
    }

    /// The meters in force now (cheap: one lock, one reference count).
    pub fn current(&self) -> Arc<MeterSet> {
        self.0
            .read()
            .map(|m| Arc::clone(&m))
            .unwrap_or_else(|poisoned| Arc::clone(&poisoned.into_inner()))
    }

    pub fn replace(&self, meters: MeterSet) {
        let fresh = Arc::new(meters);
        match self.0.write() {
            Ok(mut m) => *m = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
    }
}
