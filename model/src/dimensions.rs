//! Meter dimensions (issue 17, `docs/dimensions.md`): the event properties a meter groups its windows
//! by, the values an event has for them, and how a price book's selector matches and ranks them.
//!
//! ```text
//!  group_by ["region", "model"] ──GroupBy::new──► ["model", "region"]   (sorted, checked)
//!  Event { properties: {"model": "large", "n": 3} }
//!        ──GroupBy::values──► Dimensions [("model", Some("large")), ("region", None)]
//!                                  │ part of the window's key; JSON {"model":"large","region":null}
//!  book selector {"model": "large"} ──matches──► true; specificity 1 (keys named)
//! ```
//! A value is the property's string form: a string unescaped, a number normalized (`1.50` → `1.5`,
//! `1e3` → `1000`), `true`/`false`, and a missing property is `None` (the decoder refuses a `null`
//! property). Two spellings of
//! one value are one value, so a window never splits on how a producer wrote a number.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::event::{Event, FieldError};
use crate::json::parse_decimal;

/// At most this many keys in a meter's `group_by`.
pub const MAX_GROUP_BY: usize = 3;

/// Distinct values per (meter, key) unless the meter says otherwise.
pub const DEFAULT_MAX_DIMENSION_VALUES: u32 = 1_000;

/// The most a meter may allow per key.
pub const MAX_DIMENSION_VALUES: u32 = 100_000;

/// The longest dimension value, in bytes: three of them and their keys stay well inside a Postgres
/// index entry (2,704 bytes). An event with a longer value adds nothing to the meter.
pub const MAX_DIMENSION_VALUE_BYTES: usize = 256;

/// A meter's `group_by`: distinct, valid property keys, sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct GroupBy(Vec<String>);

impl GroupBy {
    /// Checks and sorts `keys`: at most [`MAX_GROUP_BY`], each `[a-z0-9_]{1,32}`, none twice.
    pub fn new(keys: Vec<String>) -> Result<Self, FieldError> {
        if keys.len() > MAX_GROUP_BY {
            return Err(FieldError::new("group_by", "names at most 3 property keys"));
        }
        if let Some(bad) = keys.iter().find(|k| !is_key(k)) {
            return Err(FieldError::new(
                "group_by",
                format!(
                    "keys must be 1 to 32 characters of [a-z0-9_], not {:?}",
                    crate::printable(bad)
                ),
            ));
        }
        let mut sorted = keys;
        sorted.sort();
        let before = sorted.len();
        sorted.dedup();
        if sorted.len() != before {
            return Err(FieldError::new("group_by", "names a key twice"));
        }
        Ok(GroupBy(sorted))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn keys(&self) -> &[String] {
        &self.0
    }

    /// The values `event` has for these keys (one parse of its properties).
    pub fn values(&self, event: &Event) -> Dimensions {
        if self.0.is_empty() {
            return Dimensions::default();
        }
        let raw = event.properties_named(&self.0);
        Dimensions(
            self.0
                .iter()
                .zip(raw)
                .map(|(key, raw)| (key.clone(), raw.and_then(value_of)))
                .collect(),
        )
    }
}

impl TryFrom<Vec<String>> for GroupBy {
    type Error = String;
    fn try_from(keys: Vec<String>) -> Result<Self, String> {
        GroupBy::new(keys).map_err(|e| e.message)
    }
}

impl From<GroupBy> for Vec<String> {
    fn from(g: GroupBy) -> Vec<String> {
        g.0
    }
}

/// Whether `k` may be a dimension key: 1 to 32 characters of `[a-z0-9_]`.
pub fn is_key(k: &str) -> bool {
    (1..=32).contains(&k.len())
        && k.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A property's value as a dimension value: `None` for JSON `null`; a string unescaped; a number
/// normalized; `true` / `false`. Objects and arrays (which flat properties never hold) keep their
/// JSON text.
pub fn value_of(raw: &RawValue) -> Option<String> {
    let text = raw.get().trim();
    match text.as_bytes().first() {
        None => None,
        Some(b'n') if text == "null" => None,
        Some(b'"') => {
            Some(serde_json::from_str::<String>(text).unwrap_or_else(|_| text.to_owned()))
        }
        Some(b'-' | b'0'..=b'9') => Some(match parse_decimal(text) {
            Ok(d) => d.normalize().to_string(),
            Err(_) => text.to_owned(),
        }),
        Some(_) => Some(text.to_owned()),
    }
}

/// A window's dimension values: each `group_by` key (sorted) with its value, `None` for null. A meter
/// without `group_by` has none (`{}`). Serialized as a JSON object, `{"model": "large", "region":
/// null}`; the same text in Postgres `jsonb`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dimensions(Vec<(String, Option<String>)>);

impl Dimensions {
    /// The dimensions of `pairs`, sorted by key; a key given twice keeps its last value.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, Option<String>)>) -> Self {
        let map: BTreeMap<String, Option<String>> = pairs.into_iter().collect();
        Dimensions(map.into_iter().collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The length in bytes of the longest value (0 with none).
    pub fn longest_value(&self) -> usize {
        self.0
            .iter()
            .filter_map(|(_, v)| v.as_ref().map(String::len))
            .max()
            .unwrap_or(0)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_deref()))
    }

    /// This key's value: `None` if the key is not one of these dimensions, `Some(None)` if it is null.
    pub fn get(&self, key: &str) -> Option<Option<&str>> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_deref())
    }

    /// Whether these values match a book's `selector`: every key it names has the selector's value
    /// here. The empty selector matches everything.
    pub fn matches(&self, selector: &Dimensions) -> bool {
        selector
            .iter()
            .all(|(key, value)| self.get(key) == Some(value))
    }

    /// For an invoice line's description: `model large, region null`.
    pub fn describe(&self) -> String {
        self.iter()
            .map(|(k, v)| format!("{k} {}", v.unwrap_or("null")))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Dimensions {
    /// The canonical JSON text (keys sorted, compact): `{"model":"large","region":null}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

impl std::str::FromStr for Dimensions {
    type Err = serde_json::Error;

    /// Parses the JSON object text, as `jsonb::text` gives it back (`{}` without a parse).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "{}" {
            return Ok(Dimensions::default());
        }
        serde_json::from_str(text)
    }
}

impl Serialize for Dimensions {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Dimensions {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, Option<String>>::deserialize(deserializer)?;
        Ok(Dimensions(map.into_iter().collect()))
    }
}

/// A price book's selector as posted, `{"model": "large", "region": null}`: at most 3 keys of
/// `[a-z0-9_]{1,32}`, each value a string, number or boolean (in its dimension-value form, as
/// [`value_of`] spells it) or `null`, at most [`MAX_DIMENSION_VALUE_BYTES`] long.
pub fn selector(
    map: &serde_json::Map<String, serde_json::Value>,
) -> Result<Dimensions, FieldError> {
    use serde_json::Value;
    if map.len() > MAX_GROUP_BY {
        return Err(FieldError::new("dimensions", "names at most 3 keys"));
    }
    let mut pairs = Vec::with_capacity(map.len());
    for (key, value) in map {
        let field = format!("dimensions.{}", crate::printable(key));
        if !is_key(key) {
            return Err(FieldError::new(
                field,
                "keys must be 1 to 32 characters of [a-z0-9_]",
            ));
        }
        let value = match value {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            Value::Number(_) | Value::Bool(_) => {
                let raw = serde_json::value::to_raw_value(value)
                    .map_err(|_| FieldError::new(field.clone(), "is not a value"))?;
                value_of(&raw)
            }
            Value::Array(_) | Value::Object(_) => {
                return Err(FieldError::new(
                    field,
                    "must be a string, a number, a boolean or null",
                ))
            }
        };
        if let Some(problem) = value.as_deref().and_then(value_problem) {
            return Err(FieldError::new(field, problem));
        }
        pairs.push((key.clone(), value));
    }
    Ok(Dimensions::from_pairs(pairs))
}

/// What is wrong with `value` as a dimension value a client names (a book's selector, a list's
/// filter), if anything: longer than [`MAX_DIMENSION_VALUE_BYTES`], or holding NUL, which no event's
/// value does (the decoder refuses it) and Postgres' `jsonb` cannot store.
pub fn value_problem(value: &str) -> Option<String> {
    if value.len() > MAX_DIMENSION_VALUE_BYTES {
        Some(format!("is at most {MAX_DIMENSION_VALUE_BYTES} bytes"))
    } else if value.contains('\0') {
        Some("must not contain NUL (U+0000): no event's value does".to_owned())
    } else {
        None
    }
}

/// The values admitted so far per (meter, `group_by` key), and the rule that admits more (the bound,
/// `max_dimension_values`): the one rule of the dataflow's Admit operator and of a re-rating job.
/// Values are never un-admitted.
#[derive(Clone, Debug, Default)]
pub struct Admitted(std::collections::HashMap<String, std::collections::HashMap<String, Values>>);

/// One (meter, key)'s admitted values.
#[derive(Clone, Debug, Default)]
struct Values {
    strings: std::collections::HashSet<String>,
    null: bool,
}

impl Values {
    fn contains(&self, value: Option<&str>) -> bool {
        match value {
            None => self.null,
            Some(v) => self.strings.contains(v),
        }
    }

    fn len(&self) -> usize {
        self.strings.len().saturating_add(usize::from(self.null))
    }
}

/// A value the bound refused: the key, and the value (`None`: null).
pub type Refused<'a> = (&'a str, Option<&'a str>);

impl Admitted {
    /// Whether every value of a row of `meter` with `dimensions` is admitted.
    pub fn all(&self, meter: &str, dimensions: &Dimensions) -> bool {
        dimensions.iter().all(|(key, value)| {
            self.values(meter, key)
                .is_some_and(|values| values.contains(value))
        })
    }

    /// Admits `value` of `meter`'s `key` whatever the bound (a value admitted before); true if new.
    pub fn insert(&mut self, meter: &str, key: &str, value: Option<&str>) -> bool {
        let values = self
            .0
            .entry(meter.to_owned())
            .or_default()
            .entry(key.to_owned())
            .or_default();
        match value {
            None => !std::mem::replace(&mut values.null, true),
            Some(v) => values.strings.insert(v.to_owned()),
        }
    }

    /// Admits the values of a row of `meter` with `dimensions` under `bound`: every value admitted
    /// already or with room left in its key ─► `Ok` with the values new to it (stored by the caller);
    /// else ─► `Err` with the first value refused, and nothing is admitted.
    pub fn admit<'a>(
        &mut self,
        meter: &str,
        dimensions: &'a Dimensions,
        bound: u32,
    ) -> Result<Vec<crate::batch::DimensionValue>, Refused<'a>> {
        let refused = dimensions.iter().find(|(key, value)| {
            self.values(meter, key)
                .is_some_and(|values| !values.contains(*value) && values.len() >= bound as usize)
        });
        if let Some(refused) = refused {
            return Err(refused);
        }
        Ok(dimensions
            .iter()
            .filter(|(key, value)| self.insert(meter, key, *value))
            .map(|(key, value)| (meter.to_owned(), key.to_owned(), value.map(str::to_owned)))
            .collect())
    }

    fn values(&self, meter: &str, key: &str) -> Option<&Values> {
        self.0.get(meter)?.get(key)
    }
}

/// Why the bound refused a contribution: the dead letter's reason (`DIMENSION_CARDINALITY: …`).
pub fn refusal_reason(meter: &str, bound: u32, key: &str, value: Option<&str>) -> String {
    format!(
        "DIMENSION_CARDINALITY: meter {meter} admits {bound} values of {key} and has them all; {} is \
         not one of them (raise the meter's max_dimension_values, or group by another key)",
        value.map_or_else(|| "null".to_owned(), |v| format!("{v:?}")),
    )
}

/// How specific a book is for a window, for choosing among the books effective at its start: a
/// customer-specific book before a default one, then more keys named before fewer. The greater wins.
pub fn specificity(customer_specific: bool, selector: &Dimensions) -> (bool, usize) {
    (customer_specific, selector.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode_event, Limits};

    fn event(properties: &str) -> Event {
        let json = format!(
            r#"{{"event_id":"e1","customer_id":"c","event_type":"llm","event_time":"2024-01-15T12:00:00Z","properties":{properties}}}"#
        );
        decode_event(json.as_bytes(), 1_705_320_000_000_000, &Limits::default()).unwrap()
    }

    fn group(keys: &[&str]) -> GroupBy {
        GroupBy::new(keys.iter().map(|k| k.to_string()).collect()).unwrap()
    }

    #[test]
    fn group_by_is_sorted_checked_and_bounded() {
        assert_eq!(group(&["region", "model"]).keys(), ["model", "region"]);
        for bad in [
            vec!["a", "b", "c", "d"],
            vec!["Model"],
            vec![""],
            vec!["a-b"],
            vec!["x"; 2],
        ] {
            let keys = bad.iter().map(|k| k.to_string()).collect();
            assert!(GroupBy::new(keys).is_err(), "{bad:?}");
        }
        let long = "k".repeat(33);
        assert!(GroupBy::new(vec![long]).is_err());
        let back: GroupBy = serde_json::from_str(r#"["b","a"]"#).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), r#"["a","b"]"#);
        assert!(serde_json::from_str::<GroupBy>(r#"["a","a"]"#).is_err());
    }

    #[test]
    fn a_value_is_the_property_string_form_and_missing_is_null() {
        let e = event(r#"{"model":"l\u0061rge","n":1.50,"big":1e3,"flag":true}"#);
        let d = group(&["model", "n", "big"]).values(&e);
        assert_eq!(d.get("model"), Some(Some("large")));
        assert_eq!(d.get("n"), Some(Some("1.5")));
        assert_eq!(d.get("big"), Some(Some("1000")));
        // (The decoder refuses a `null` property, so null means missing.)
        let d = group(&["flag", "absent"]).values(&e);
        assert_eq!(d.get("flag"), Some(Some("true")));
        assert_eq!(d.get("absent"), Some(None));
        assert_eq!(d.get("model"), None, "not a key of this group");
        assert_eq!(d.to_string(), r#"{"absent":null,"flag":"true"}"#);
        assert_eq!(
            value_of(&serde_json::from_str::<Box<RawValue>>("null").unwrap()),
            None
        );
        assert!(GroupBy::default().values(&e).is_empty());
        assert_eq!(Dimensions::default().to_string(), "{}");
    }

    #[test]
    fn a_selector_is_checked_and_spelled_as_dimension_values() {
        let map = |json: &str| serde_json::from_str::<serde_json::Map<_, _>>(json).unwrap();
        let sel = selector(&map(r#"{"region":null,"n":1.50,"model":"large"}"#)).unwrap();
        assert_eq!(
            sel.to_string(),
            r#"{"model":"large","n":"1.5","region":null}"#
        );
        for bad in [
            r#"{"a":1,"b":2,"c":3,"d":4}"#,
            r#"{"Model":"x"}"#,
            r#"{"m":[1]}"#,
            r#"{"m":{"x":1}}"#,
            r#"{"m":"a\u0000b"}"#,
        ] {
            assert!(selector(&map(bad)).is_err(), "{bad}");
        }
        let long = format!(r#"{{"m":"{}"}}"#, "x".repeat(257));
        assert!(selector(&map(&long)).is_err());
    }

    #[test]
    fn two_spellings_of_one_value_are_one_value() {
        let a = group(&["n", "s"]).values(&event(r#"{"n":2.0,"s":"x\u0079"}"#));
        let b = group(&["n", "s"]).values(&event(r#"{"n":2,"s":"xy"}"#));
        assert_eq!(a, b);
    }

    #[test]
    fn dimensions_round_trip_through_json_and_keep_their_order() {
        let d = Dimensions::from_pairs([
            ("region".to_owned(), None),
            ("model".to_owned(), Some("large".to_owned())),
        ]);
        let text = d.to_string();
        assert_eq!(text, r#"{"model":"large","region":null}"#);
        let back: Dimensions = serde_json::from_str(&text).unwrap();
        assert_eq!(back, d);
        assert_eq!(d.describe(), "model large, region null");
    }

    #[test]
    fn a_selector_matches_on_every_key_it_names_and_more_keys_are_more_specific() {
        let window = Dimensions::from_pairs([
            ("model".to_owned(), Some("large".to_owned())),
            ("region".to_owned(), None),
        ]);
        let sel = |pairs: &[(&str, Option<&str>)]| {
            Dimensions::from_pairs(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.map(str::to_owned))),
            )
        };
        assert!(window.matches(&Dimensions::default()));
        assert!(window.matches(&sel(&[("model", Some("large"))])));
        assert!(window.matches(&sel(&[("model", Some("large")), ("region", None)])));
        assert!(!window.matches(&sel(&[("model", Some("small"))])));
        assert!(!window.matches(&sel(&[("region", Some("eu"))])));
        assert!(!window.matches(&sel(&[("tier", None)])), "not a key here");
        let ranked =
            |customer: bool, pairs: &[(&str, Option<&str>)]| specificity(customer, &sel(pairs));
        assert!(ranked(true, &[]) > ranked(false, &[("model", Some("large")), ("region", None)]));
        assert!(ranked(false, &[("model", Some("large"))]) > ranked(false, &[]));
    }
}
