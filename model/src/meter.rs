//! Meters (SPEC §4): which events a meter reads, how it aggregates them and over which windows, and how
//! one event turns into [`Contribution`]s to aggregate rows.
//!
//! ```text
//!  Event ──MeterSet::contributions──► for each meter reading its event_type (or the default meter):
//!     count / sum            ─► (key, None,       Aggregate(value, 1))      a group: rows add up
//!     max / unique / latest  ─► (key, Some(item), Aggregate(0, 1))          a multiset of items per row
//! ```
//! Sums and counts are a commutative group, so a row is the sum of its contributions and a retraction
//! (a void) is the negation. `max`, `unique_count` and `latest` are not: their row is a function of the
//! multiset of items it holds, which the sink keeps (`meter_values`) so a retraction can remove one.

use std::collections::HashMap;

use compact_str::CompactString;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::aggregate::{Aggregate, AggregateKey};
use crate::dimensions::{
    Dimensions, GroupBy, DEFAULT_MAX_DIMENSION_VALUES, MAX_DIMENSION_VALUES,
    MAX_DIMENSION_VALUE_BYTES,
};
use crate::event::{Event, FieldError};
use crate::json::{parse_decimal, MAX_EVENT_VALUE};
use crate::window::Window;

/// How a meter aggregates the events of a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    Count,
    Sum,
    Max,
    UniqueCount,
    Latest,
}

impl Aggregation {
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregation::Count => "count",
            Aggregation::Sum => "sum",
            Aggregation::Max => "max",
            Aggregation::UniqueCount => "unique_count",
            Aggregation::Latest => "latest",
        }
    }
}

/// A meter definition, as the API and the config file take it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Meter {
    #[cfg_attr(feature = "openapi", schema(value_type = crate::openapi::Name))]
    pub meter: String,
    #[cfg_attr(feature = "openapi", schema(value_type = crate::openapi::Name))]
    pub event_type: String,
    pub aggregation: Aggregation,
    /// `value` or `properties.<key>`; needed by every aggregation but `count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_property: Option<String>,
    #[serde(default = "default_window")]
    pub window: Window,
    /// The event properties each window is also keyed by, e.g. `["model", "region"]`: at most 3 keys
    /// of `[a-z0-9_]{1,32}` (docs/dimensions.md). Empty: windows per customer only.
    #[serde(default, skip_serializing_if = "GroupBy::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>, max_items = 3))]
    pub group_by: GroupBy,
    /// How many distinct values each `group_by` key may take (default 1,000, at most 100,000); an
    /// event bringing one more is a dead letter `dimension_cardinality`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 100000))]
    pub max_dimension_values: Option<u32>,
}

fn default_window() -> Window {
    Window::Hour
}

impl Meter {
    /// The meter an event_type gets when no meter reads it: `sum` of `value`, hourly (SPEC §4).
    pub fn default_for(event_type: &str) -> Meter {
        Meter {
            meter: event_type.to_owned(),
            event_type: event_type.to_owned(),
            aggregation: Aggregation::Sum,
            value_property: Some("value".into()),
            window: Window::Hour,
            group_by: GroupBy::default(),
            max_dimension_values: None,
        }
    }

    /// How many distinct values each of its `group_by` keys may take.
    pub fn dimension_bound(&self) -> u32 {
        self.max_dimension_values
            .unwrap_or(DEFAULT_MAX_DIMENSION_VALUES)
    }

    /// Checks a definition, reporting every bad field with its name.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
                })
        };
        if !name_ok(&self.meter) {
            errors.push(FieldError::new(
                "meter",
                "must be 1 to 64 characters of [a-z0-9_.-]",
            ));
        }
        if !name_ok(&self.event_type) {
            errors.push(FieldError::new(
                "event_type",
                "must be 1 to 64 characters of [a-z0-9_.-]",
            ));
        }
        match (&self.aggregation, self.value_property.as_deref()) {
            (Aggregation::Count, _) => {}
            (_, None) => errors.push(FieldError::new(
                "value_property",
                "is required for sum, max, unique_count and latest",
            )),
            (_, Some("value")) => {}
            (_, Some(p)) => match p.strip_prefix("properties.") {
                Some(key) if !key.is_empty() && key.len() <= 128 => {}
                _ => errors.push(FieldError::new(
                    "value_property",
                    "must be `value` or `properties.<key>`",
                )),
            },
        }
        match self.max_dimension_values {
            Some(n) if !(1..=MAX_DIMENSION_VALUES).contains(&n) => errors.push(FieldError::new(
                "max_dimension_values",
                format!("must be 1 to {MAX_DIMENSION_VALUES}"),
            )),
            Some(_) if self.group_by.is_empty() => errors.push(FieldError::new(
                "max_dimension_values",
                "bounds the values of group_by keys; this meter has no group_by",
            )),
            _ => {}
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The key of the row `event` falls in. (`contribution` also checks the dimension values'
    /// length; this does not.)
    pub fn key(&self, event: &Event) -> AggregateKey {
        let start = self.window.start_of(event.event_time_micros);
        AggregateKey {
            customer_id: CompactString::from(event.customer_id.as_str()),
            meter: CompactString::from(self.meter.as_str()),
            dimensions: self.group_by.values(event),
            window_start: start,
            window_end: start.saturating_add(self.window.seconds()),
        }
    }

    /// What `event` contributes to this meter, or why it contributes nothing (a property the meter
    /// reads is missing or not of the right kind).
    pub fn contribution(&self, event: &Event) -> Result<Contribution, Skip> {
        let key = self.key(event);
        if key.dimensions.longest_value() > MAX_DIMENSION_VALUE_BYTES {
            return Err(Skip::DimensionTooLong);
        }
        let (item, usage) = match self.aggregation {
            Aggregation::Count => (None, Aggregate::of(Decimal::ONE)),
            Aggregation::Sum => (None, Aggregate::of(self.number(event)?)),
            Aggregation::Max => (Some(Item::Max(self.number(event)?.normalize())), one()),
            Aggregation::UniqueCount => (Some(Item::Unique(self.text(event)?)), one()),
            Aggregation::Latest => (
                Some(Item::Latest(Box::new(Latest {
                    time_micros: event.event_time_micros,
                    event_id: event.event_id.clone(),
                    value: self.number(event)?,
                }))),
                one(),
            ),
        };
        Ok(Contribution { key, item, usage })
    }

    fn number(&self, event: &Event) -> Result<Decimal, Skip> {
        match self.property_key() {
            None => Ok(event.value),
            Some(key) => {
                let raw = event.property(key).ok_or(Skip::MissingProperty)?;
                property_number(raw).ok_or(Skip::NotANumber)
            }
        }
    }

    fn text(&self, event: &Event) -> Result<String, Skip> {
        match self.property_key() {
            None => Ok(event.value.normalize().to_string()),
            Some(key) => event
                .property(key)
                .map(canonical_text)
                .ok_or(Skip::MissingProperty),
        }
    }

    fn property_key(&self) -> Option<&str> {
        self.value_property
            .as_deref()
            .and_then(|p| p.strip_prefix("properties."))
    }
}

/// A property's value as a meter's number: a JSON number, or a string holding one (unescaped first, so
/// `"100\u0030"` is 1000 on every path), not negative and at most [`MAX_EVENT_VALUE`].
fn property_number(raw: &RawValue) -> Option<Decimal> {
    let text = raw.get();
    let parsed = if text.starts_with('"') {
        parse_decimal(&serde_json::from_str::<String>(text).ok()?)
    } else {
        parse_decimal(text)
    };
    match parsed {
        Ok(d) if (!d.is_sign_negative() || d.is_zero()) && d <= MAX_EVENT_VALUE => Some(d),
        _ => None,
    }
}

/// A property value as a distinct item: strings unescaped and quoted, numbers normalized, so the same
/// value spelled differently (`"a\u0062"`, `1.50`) is one item, before and after a round trip through
/// Postgres `jsonb`.
fn canonical_text(raw: &RawValue) -> String {
    let text = raw.get();
    if text.starts_with('"') {
        match serde_json::from_str::<String>(text) {
            Ok(s) => serde_json::to_string(&s).unwrap_or_else(|_| text.to_owned()),
            Err(_) => text.to_owned(),
        }
    } else {
        match parse_decimal(text) {
            Ok(d) => d.normalize().to_string(),
            Err(_) => text.to_owned(),
        }
    }
}

fn one() -> Aggregate {
    Aggregate {
        value: Decimal::ZERO,
        event_count: 1,
    }
}

/// Why an event adds nothing to one of the meters reading its type (it still counts in the others).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    MissingProperty,
    NotANumber,
    /// A `group_by` property's value is longer than [`MAX_DIMENSION_VALUE_BYTES`]: a window key must
    /// fit a Postgres index entry.
    DimensionTooLong,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::MissingProperty => "missing_property",
            Skip::NotANumber => "not_a_number",
            Skip::DimensionTooLong => "dimension_too_long",
        }
    }
}

/// One element of a non-group row's multiset.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Item {
    /// A value of a `max` meter (normalized, so equal values are one item).
    Max(Decimal),
    /// A distinct value of a `unique_count` meter, as its JSON text.
    Unique(String),
    /// An event of a `latest` meter: the row's value is that of the greatest (time, event_id).
    /// Boxed, so that an item (and every row key, which holds an `Option<Item>`) stays small.
    Latest(Box<Latest>),
}

/// An event of a `latest` meter, as an [`Item`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Latest {
    pub time_micros: i64,
    pub event_id: String,
    pub value: Decimal,
}

/// What one event adds to one row: `usage` with `item` for the multiset meters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contribution {
    pub key: AggregateKey,
    pub item: Option<Item>,
    pub usage: Aggregate,
}

impl Contribution {
    /// An event's contribution to its default meter's row, as `Meter::default_for(type).key(event)`
    /// gives it, without building that meter for every event (its three strings, made and dropped).
    /// It takes the texts it keeps as the caller has them: an owned event's strings are moved (a long
    /// one keeps its buffer), a borrowed event's are copied once, into the key.
    pub fn by_default_meter(
        customer_id: impl Into<CompactString>,
        event_type: impl Into<CompactString>,
        event_time_micros: i64,
        value: Decimal,
    ) -> Contribution {
        let window = Window::Hour;
        let start = window.start_of(event_time_micros);
        Contribution {
            key: AggregateKey {
                customer_id: customer_id.into(),
                meter: event_type.into(),
                dimensions: Dimensions::default(),
                window_start: start,
                window_end: start.saturating_add(window.seconds()),
            },
            item: None,
            usage: Aggregate::of(value),
        }
    }
}

/// The meters in force, indexed by the event_type they read.
#[derive(Clone, Debug, Default)]
pub struct MeterSet {
    by_type: HashMap<String, Vec<Meter>>,
}

impl MeterSet {
    pub fn new(meters: impl IntoIterator<Item = Meter>) -> Self {
        let mut by_type: HashMap<String, Vec<Meter>> = HashMap::new();
        for m in meters {
            by_type.entry(m.event_type.clone()).or_default().push(m);
        }
        MeterSet { by_type }
    }

    pub fn len(&self) -> usize {
        self.by_type.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }

    /// Every contribution `event` makes, and the meters it skips with the reason. An event_type no
    /// meter reads goes to its default meter.
    pub fn contributions(&self, event: &Event) -> (Vec<Contribution>, Vec<(String, Skip)>) {
        let mut skipped = Vec::new();
        let contributions = match self.by_type.get(&event.event_type) {
            Some(meters) => meters
                .iter()
                .filter_map(|m| match m.contribution(event) {
                    Ok(c) => Some(c),
                    Err(skip) => {
                        skipped.push((m.meter.clone(), skip));
                        None
                    }
                })
                .collect(),
            None => vec![Contribution::by_default_meter(
                event.customer_id.as_str(),
                event.event_type.as_str(),
                event.event_time_micros,
                event.value,
            )],
        };
        (contributions, skipped)
    }

    /// Whether a meter reads `event_type` (else its events go to their default meter).
    pub fn reads(&self, event_type: &str) -> bool {
        self.by_type.contains_key(event_type)
    }

    /// The window length of a meter by name, with the default meter's for names no meter has.
    pub fn window_of(&self, meter: &str) -> Window {
        self.by_type
            .values()
            .flatten()
            .find(|m| m.meter == meter)
            .map_or(Window::Hour, |m| m.window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{decode_event, Limits};

    fn event(id: &str, time: &str, value: &str, props: &str) -> Event {
        let json = format!(
            r#"{{"event_id":"{id}","customer_id":"c","event_type":"api_call","event_time":"{time}","value":"{value}","properties":{props}}}"#
        );
        decode_event(json.as_bytes(), i64::MAX / 2, &Limits::default()).unwrap()
    }

    fn meter(aggregation: Aggregation, property: Option<&str>, window: Window) -> Meter {
        Meter {
            meter: "m".into(),
            event_type: "api_call".into(),
            aggregation,
            value_property: property.map(str::to_owned),
            window,
            group_by: Default::default(),
            max_dimension_values: None,
        }
    }

    #[test]
    fn an_unmetered_type_gets_an_hourly_sum_named_after_it() {
        let e = event("a", "2024-01-15T14:30:00Z", "2.5", "{}");
        let (c, skipped) = MeterSet::default().contributions(&e);
        assert!(skipped.is_empty());
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].key.meter, "api_call");
        assert_eq!(c[0].key.window_end - c[0].key.window_start, 3_600);
        assert_eq!(c[0].usage, Aggregate::of(Decimal::new(25, 1)));
    }

    #[test]
    fn the_default_row_is_the_default_meters_key() {
        let e = event("a", "1969-12-31T23:59:59.5Z", "2.5", "{}");
        let (c, _) = MeterSet::default().contributions(&e);
        assert_eq!(c[0].key, Meter::default_for("api_call").key(&e));
        assert_eq!(c[0].key, AggregateKey::default_meter(&e));
    }

    #[test]
    fn several_meters_read_one_type_each_in_its_own_window() {
        let set = MeterSet::new([
            Meter {
                meter: "calls".into(),
                ..meter(Aggregation::Count, None, Window::Minute)
            },
            Meter {
                meter: "peak".into(),
                ..meter(Aggregation::Max, Some("properties.tokens"), Window::Day)
            },
        ]);
        let e = event("a", "2024-01-15T14:30:10Z", "1", r#"{"tokens":"0700"}"#);
        let (c, _) = set.contributions(&e);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].key.window_end - c[0].key.window_start, 60);
        assert_eq!(c[1].item, Some(Item::Max(Decimal::from(700))));
        assert_eq!(c[1].key.window_end - c[1].key.window_start, 86_400);
    }

    #[test]
    fn a_missing_or_non_numeric_property_skips_only_that_meter() {
        let set = MeterSet::new([
            meter(Aggregation::Sum, Some("properties.bytes"), Window::Hour),
            Meter {
                meter: "users".into(),
                ..meter(
                    Aggregation::UniqueCount,
                    Some("properties.user"),
                    Window::Hour,
                )
            },
        ]);
        let (c, skipped) =
            set.contributions(&event("a", "2024-01-15T14:30:10Z", "1", r#"{"user":"u1"}"#));
        assert_eq!(skipped, vec![("m".to_owned(), Skip::MissingProperty)]);
        assert_eq!(c[0].item, Some(Item::Unique("\"u1\"".into())));
        let (_, skipped) = set.contributions(&event(
            "b",
            "2024-01-15T14:30:10Z",
            "1",
            r#"{"bytes":"x","user":1}"#,
        ));
        assert_eq!(skipped, vec![("m".to_owned(), Skip::NotANumber)]);
    }

    #[test]
    fn definitions_are_checked_field_by_field() {
        let bad = Meter {
            meter: "Bad Name".into(),
            ..meter(Aggregation::Sum, None, Window::Hour)
        };
        let fields: Vec<String> = bad
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, ["meter", "value_property"]);
        assert!(meter(Aggregation::Count, None, Window::Day)
            .validate()
            .is_ok());
        assert!(meter(Aggregation::Latest, Some("properties."), Window::Day)
            .validate()
            .is_err());
    }
}
