//! The CSV engine's rows: each worker's table of (customer, meter, window) → [`Usage`], keyed by
//! interned customer ids and hashed with a folded multiply.
//! Rows are a commutative group: a duplicate's contributions are taken back by adding their negation.

use super::*;
use meterflow_model::AggregateKey;

// ---- hashing -----------------------------------------------------------------------------------

/// A folded multiply: fast and well mixed in every bit (hashbrown uses the top 7 and the low bits).
pub(super) fn mix(x: u64) -> u64 {
    let p = u128::from(x).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
    (p as u64) ^ ((p >> 64) as u64)
}

/// A seeded hash of bytes (the seed is random per run: a file cannot aim at collisions; equal hashes
/// are always checked on the bytes themselves). Words of 8 bytes; the tail is the last 8 bytes
/// (overlapping) or, for fewer than 8, the bytes shifted in: no copy, no call.
pub(super) fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    let len = bytes.len();
    let mut h = seed ^ (len as u64).wrapping_mul(0xff51_afd7_ed55_8ccd);
    if len >= 8 {
        let mut at = 0;
        while at + 8 <= len {
            h = mix(h ^ word(bytes, at));
            at += 8;
        }
        if at < len {
            h = mix(h ^ word(bytes, len - 8) ^ 0xc4ce_b9fe_1a85_ec53);
        }
    } else {
        let w = bytes
            .iter()
            .enumerate()
            .fold(0u64, |w, (i, b)| w | (u64::from(*b) << (8 * i)));
        h = mix(h ^ w ^ 0xc4ce_b9fe_1a85_ec53);
    }
    mix(h)
}

/// The 8 bytes at `at` as a little-endian word (0 past the end).
pub(super) fn word(bytes: &[u8], at: usize) -> u64 {
    bytes
        .get(at..at + 8)
        .and_then(|w| <[u8; 8]>::try_from(w).ok())
        .map_or(0, u64::from_le_bytes)
}

// ---- metering ----------------------------------------------------------------------------------

/// Strings by number, in order of first sight. A name of up to 16 bytes is also kept in its table
/// entry, so finding it touches the table alone.
#[derive(Default)]
pub(super) struct Interner {
    pub(super) names: Vec<Box<str>>,
    /// (hash, id, length, the first 16 bytes).
    pub(super) table: HashTable<(u64, u32, u32, [u8; 16])>,
}

impl Interner {
    pub(super) fn intern(&mut self, seed: u64, name: &str) -> u32 {
        let h = hash_bytes(seed, name.as_bytes());
        let names = &self.names;
        let len = name.len();
        if let Some(&(_, id, _, _)) = self.table.find(h, |(eh, id, elen, inline)| {
            *eh == h
                && *elen as usize == len
                && match inline.get(..len) {
                    Some(inline) => inline == name.as_bytes(),
                    None => names.get(*id as usize).is_some_and(|n| &**n == name),
                }
        }) {
            return id;
        }
        let id = self.names.len() as u32;
        let mut inline = [0u8; 16];
        if let (Some(dst), Some(src)) = (inline.get_mut(..len), name.as_bytes().get(..len)) {
            dst.copy_from_slice(src);
        }
        self.names.push(name.into());
        self.table
            .insert_unique(h, (h, id, len as u32, inline), |(eh, ..)| *eh);
        id
    }
}

/// A row: (customer, meter, window start, window end) with customer and meter interned.
pub(super) type RowKey = (u32, u32, i64, i64);

/// Rows added up as the dataflow adds them: [`Usage`] per row.
pub(super) struct Rows {
    pub(super) seed: u64,
    pub(super) meters: Meters,
    pub(super) customers: Interner,
    pub(super) meter_names: Interner,
    /// Event types seen, and each one's default meter: (meter id, window) by type id.
    pub(super) types: Interner,
    pub(super) defaults: Vec<(u32, Window)>,
    pub(super) rows: WindowRows,
}

/// The rows, one small table per (meter, window) keyed by customer: events arrive roughly in time
/// order, so the tables of the windows being filled stay in cache, where one table of every row would
/// be a cache miss per event.
#[derive(Default)]
pub(super) struct WindowRows {
    /// (meter, window start) → index in `tables`.
    pub(super) index: HashTable<(u32, i64, usize)>,
    /// (meter, window start, window end, customer → usage).
    pub(super) tables: Vec<WindowTable>,
    /// The last table used.
    pub(super) last: Option<(u32, i64, usize)>,
}

/// (meter, window start, window end, customer → usage).
pub(super) type WindowTable = (u32, i64, i64, HashTable<(u32, Usage)>);

pub(super) fn window_hash(meter: u32, start: i64) -> u64 {
    mix(u64::from(meter) ^ mix(start as u64))
}

pub(super) fn customer_hash(customer: u32) -> u64 {
    mix(u64::from(customer) ^ 0x51_7cc1_b727_220a)
}

impl WindowRows {
    pub(super) fn add(&mut self, (customer, meter, start, end): RowKey, usage: Usage) {
        let i = match self.last {
            Some((m, s, i)) if m == meter && s == start => i,
            _ => {
                let h = window_hash(meter, start);
                let i = match self.index.find(h, |&(m, s, _)| m == meter && s == start) {
                    Some(&(_, _, i)) => i,
                    None => {
                        let i = self.tables.len();
                        self.tables.push((meter, start, end, HashTable::new()));
                        self.index
                            .insert_unique(h, (meter, start, i), |&(m, s, _)| window_hash(m, s));
                        i
                    }
                };
                self.last = Some((meter, start, i));
                i
            }
        };
        let Some((_, _, _, table)) = self.tables.get_mut(i) else {
            return;
        };
        let h = customer_hash(customer);
        match table.find_mut(h, |(c, _)| *c == customer) {
            Some((_, sum)) => sum.plus_equals(&usage),
            None => {
                table.insert_unique(h, (customer, usage), |(c, _)| customer_hash(*c));
            }
        }
    }

    /// Marks the row overflowed (the sink's quarantine), keeping its event count.
    pub(super) fn quarantine(&mut self, key: RowKey) {
        self.add(key, Usage::overflowed(0));
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (RowKey, &Usage)> + '_ {
        self.tables
            .iter()
            .flat_map(|(m, s, e, table)| table.iter().map(move |(c, u)| ((*c, *m, *s, *e), u)))
    }
}

impl Rows {
    pub(super) fn new(seed: u64) -> Self {
        Rows {
            seed,
            // No meter is defined in this mode: every event type goes to its default meter, exactly as in
            // the pipeline (dataflow/src/meters.rs).
            meters: Meters::new(Vec::new()),
            customers: Interner::default(),
            meter_names: Interner::default(),
            types: Interner::default(),
            defaults: Vec::new(),
            rows: WindowRows::default(),
        }
    }

    /// Adds the event's contributions (their negation with `retract`).
    pub(super) fn add(&mut self, event: &Event, retract: bool) -> Result<()> {
        if self.meters.is_empty() {
            // Every type goes to its default meter (`MeterSet::contributions` with no meter): one
            // contribution, `Meter::default_for(type)`'s row, `Aggregate::of(value)`. The definition is
            // looked up once per type, not built (3 strings) and keyed (2 more) per event; the unit test
            // `the_default_meter_path_equals_meter_set_contributions` holds the two paths equal.
            let t = self.types.intern(self.seed, &event.event_type);
            let (meter, window) = match self.defaults.get(t as usize) {
                Some(d) => *d,
                None => {
                    let m = Meter::default_for(&event.event_type);
                    let d = (self.meter_names.intern(self.seed, &m.meter), m.window);
                    self.defaults.push(d);
                    d
                }
            };
            let start = window.start_of(event.event_time_micros);
            let key: RowKey = (
                self.customers.intern(self.seed, &event.customer_id),
                meter,
                start,
                start.saturating_add(window.seconds()),
            );
            self.add_row(key, Aggregate::of(event.value), retract);
            return Ok(());
        }
        let (contributions, _skipped) = self.meters.contributions(event);
        for c in contributions {
            if c.item.is_some() {
                bail!(
                    "meter {} is not a sum or count meter; --csv supports only those",
                    c.key.meter
                );
            }
            let key = self.row_of(&c.key);
            self.add_row(key, c.usage, retract);
        }
        Ok(())
    }

    /// The row of a meter's key, its names interned. Its dimension values are not kept: every type
    /// goes to its default meter in this mode, which has none.
    pub(super) fn row_of(&mut self, key: &AggregateKey) -> RowKey {
        (
            self.customers.intern(self.seed, &key.customer_id),
            self.meter_names.intern(self.seed, &key.meter),
            key.window_start,
            key.window_end,
        )
    }

    pub(super) fn add_row(&mut self, key: RowKey, aggregate: Aggregate, retract: bool) {
        let mut usage = Usage::of(aggregate);
        if retract {
            usage.negate();
        }
        self.rows.add(key, usage);
    }

    /// The rows with names: (customer, meter, window start, window end) → usage.
    #[cfg(test)]
    pub(super) fn named(&self) -> BTreeMap<(String, String, i64, i64), Usage> {
        let name = |i: &Interner, id: u32| {
            i.names
                .get(id as usize)
                .map_or(String::new(), |n| n.to_string())
        };
        self.rows
            .iter()
            .map(|((c, m, ws, we), u)| {
                (
                    (name(&self.customers, c), name(&self.meter_names, m), ws, we),
                    *u,
                )
            })
            .collect()
    }
}

// ---- reading -----------------------------------------------------------------------------------
