//! A price book as posted, and a PATCH to one: the wire shapes (with their OpenAPI schemas), and the
//! reading of them into a [`PriceBook`] or a [`Patch`], every bad field reported with its path.
//!
//! ```text
//!  NewPriceBook ─► resolve ─► PriceBook        (the seed's shape too: metric_type, unit_price, USD)
//!  PATCH fields ─► Patch::parse ─► Patch::apply(book) ─► PriceBook
//!  decimals: JSON numbers or strings, parsed exactly (Errors::decimal); times: RFC 3339
//! ```
//!
//! Length: 144 of its lines are tests; the rest is the two wire shapes (seed and native) and their
//! reading, which must agree field by field.

use meterflow_model::dimensions::selector;
use meterflow_model::json::parse_decimal;
use meterflow_model::money::is_currency;
use meterflow_model::{Dimensions, FieldError, Meter, PriceBook, PriceModel, RateEntry, Tier};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::time::{exclusive_end, parse_rfc3339};

/// The currency of a book posted without one (SPEC §12).
const DEFAULT_CURRENCY: &str = "USD";

const MODEL_TYPES: &str = "per_unit, graduated, volume or package";

/// A price book as posted: SPEC §5's shape, or the seed's (SPEC §12).
///
/// `meter` (or the seed's `metric_type`), and `model` (or the seed's `unit_price` for per_unit).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPriceBook {
    meter: Option<String>,
    /// The seed's name for `meter`.
    metric_type: Option<String>,
    /// A customer's own book; null or absent: the default for every customer.
    customer_id: Option<String>,
    /// The dimension values of the windows the book prices, `{"model": "large"}` (keys of the
    /// meter's `group_by`; a value may be null). Absent or `{}`: every window. Of the books in force
    /// for a window, the most specific wins: the customer's own before a default, then more keys
    /// named before fewer.
    #[schema(value_type = Option<Object>)]
    dimensions: Option<Map<String, Value>>,
    /// Default USD.
    #[schema(value_type = Option<meterflow_model::openapi::Currency>)]
    currency: Option<String>,
    /// RFC 3339.
    #[schema(required = true, value_type = String)]
    effective_from: Option<String>,
    /// RFC 3339; null: open.
    effective_to: Option<String>,
    model: Option<RawModel>,
    /// A rate card: one book whose entries each price the windows their `dimensions` match, as a
    /// book of their own would (of the entries and books in force for a window, the most specific
    /// wins), sharing this book's customer, currency, range and minimum. Give either `entries` or
    /// `model` (with `dimensions`), not both. 1 to 100 entries, each selector once.
    #[schema(max_items = 100, min_items = 1)]
    entries: Option<Vec<RawEntry>>,
    /// The seed's shorthand for `"model": {"type": "per_unit", "unit_price": …}`.
    #[schema(value_type = Option<meterflow_model::openapi::DecimalIn>)]
    unit_price: Option<Value>,
    /// The least a customer pays for the meter per period.
    #[schema(value_type = Option<meterflow_model::openapi::DecimalIn>)]
    minimum_per_period: Option<Value>,
}

/// One entry of a rate card as posted.
#[derive(Deserialize, utoipa::ToSchema)]
#[schema(as = RateEntry)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEntry {
    /// The dimension values of the windows the entry prices (keys of the meter's `group_by`; a
    /// value may be null); `{}` or absent: every window no more specific entry or book prices.
    #[schema(value_type = Option<Object>)]
    dimensions: Option<Map<String, Value>>,
    #[schema(required = true)]
    model: Option<RawModel>,
}

/// The most entries a rate card may list.
pub const MAX_ENTRIES: usize = 100;

/// A model as posted; which fields it needs depends on its type. Decimals stay JSON values until they
/// are parsed exactly.
///
/// per_unit needs unit_price; graduated and volume need tiers (the last open, up_to null); package
/// needs package_size and package_price.
#[derive(Default, Deserialize, utoipa::ToSchema)]
#[schema(as = PriceModel)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModel {
    #[serde(rename = "type")]
    #[schema(required = true, value_type = ModelType)]
    kind: Option<String>,
    #[schema(value_type = Option<meterflow_model::openapi::DecimalIn>)]
    unit_price: Option<Value>,
    tiers: Option<Vec<RawTier>>,
    #[schema(value_type = Option<meterflow_model::openapi::DecimalIn>)]
    package_size: Option<Value>,
    #[schema(value_type = Option<meterflow_model::openapi::DecimalIn>)]
    package_price: Option<Value>,
}

/// How a quantity is priced (SPEC §5).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // the schema of `RawModel::kind`, which stays text until validated
#[schema(rename_all = "snake_case")]
enum ModelType {
    PerUnit,
    Graduated,
    Volume,
    Package,
}

/// One tier of a graduated or volume model.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RawTier {
    /// `null` or absent: the last, open tier.
    #[schema(value_type = Option<meterflow_model::openapi::DecimalIn>)]
    up_to: Option<Value>,
    #[schema(value_type = Option<meterflow_model::openapi::DecimalIn>)]
    unit_price: Option<Value>,
    /// Charged once when any unit falls in the tier (graduated) or when the total does (volume).
    #[schema(value_type = Option<meterflow_model::openapi::DecimalIn>)]
    flat_fee: Option<Value>,
}

/// What `PATCH /api/v1/price-books/{price_book_id}` may change: an absent field stays, a null one is
/// cleared.
// The patch is read field by field (`Patch::parse`), so that null and absent differ; this type is its
// schema, and `the_patch_schema_names_the_fields_the_parser_takes` keeps the two in step.
#[derive(Deserialize, utoipa::ToSchema)]
#[schema(as = PriceBookPatch)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(crate) struct PatchFields {
    #[serde(default)]
    model: RawModel,
    #[schema(value_type = Option<meterflow_model::openapi::DecimalIn>)]
    minimum_per_period: Option<Value>,
    /// RFC 3339; null: open.
    effective_to: Option<String>,
    /// A rate card's entries, all of them (a card's prices change only here; a plain book's only
    /// through `model`).
    #[schema(max_items = 100, min_items = 1)]
    entries: Option<Vec<RawEntry>>,
}

/// What a PATCH changes; `None` leaves a field as it is, `Some(None)` clears it.
pub(super) struct Patch {
    model: Option<PriceModel>,
    entries: Option<Vec<RateEntry>>,
    minimum_per_period: Option<Option<Decimal>>,
    effective_to: Option<Option<i64>>,
}

impl Patch {
    pub(super) fn parse(fields: Map<String, Value>) -> Result<Patch, ApiError> {
        let mut errors = Errors::default();
        let mut patch = Patch {
            model: None,
            entries: None,
            minimum_per_period: None,
            effective_to: None,
        };
        for (key, value) in fields {
            match key.as_str() {
                "model" => {
                    let raw: RawModel = serde_json::from_value(value)
                        .map_err(|e| ApiError::MalformedJson(format!("model: {e}")))?;
                    patch.model = errors.model(&raw);
                }
                "entries" => {
                    let raw: Vec<RawEntry> = serde_json::from_value(value)
                        .map_err(|e| ApiError::MalformedJson(format!("entries: {e}")))?;
                    patch.entries = errors.entries(&raw);
                }
                "minimum_per_period" => {
                    patch.minimum_per_period = match value {
                        Value::Null => Some(None),
                        v => errors.minimum(&v).map(Some),
                    };
                }
                "effective_to" => {
                    patch.effective_to = match value {
                        Value::Null => Some(None),
                        Value::String(text) => errors.end("effective_to", &text).map(Some),
                        _ => {
                            errors.push("effective_to", "must be an RFC 3339 timestamp or null");
                            None
                        }
                    };
                }
                "price_book_id" | "meter" | "metric_type" | "customer_id" | "currency"
                | "effective_from" | "unit_price" | "created_at" | "updated_at" => errors.push(
                    key,
                    "cannot be changed: a PATCH may change model (entries for a rate card), \
                     minimum_per_period and effective_to; create another book for the rest",
                ),
                _ => errors.push(key, "is not a field of a price book"),
            }
        }
        errors
            .finish()
            .map(|()| patch)
            .map_err(ApiError::Validation)
    }

    /// The book with this patch applied, if the result is a valid book.
    pub(super) fn apply(&self, book: &PriceBook) -> Result<PriceBook, Vec<FieldError>> {
        let mut after = book.clone();
        match (&self.model, &self.entries, book.is_card()) {
            (Some(_), _, true) => {
                return Err(vec![FieldError::new(
                    "model",
                    "this book is a rate card: its prices are its entries; PATCH entries",
                )])
            }
            (_, Some(_), false) => {
                return Err(vec![FieldError::new(
                    "entries",
                    "this book is not a rate card: PATCH its model (or create a rate card)",
                )])
            }
            (Some(model), _, false) => after.model = model.clone(),
            (None, Some(entries), true) => after.set_entries(entries.clone()),
            (None, None, _) => {}
        }
        if let Some(minimum) = self.minimum_per_period {
            after.minimum_per_period = minimum;
        }
        if let Some(to) = self.effective_to {
            after.effective_to = to;
        }
        match after.effective_to {
            Some(to) if to <= after.effective_from => Err(vec![FieldError::new(
                "effective_to",
                "must be after the book's effective_from",
            )]),
            _ => Ok(after),
        }
    }
}

/// Checks every field of a posted book and builds it, or says what is wrong with each bad field.
pub(super) fn resolve(
    raw: NewPriceBook,
    price_book_id: String,
) -> Result<PriceBook, Vec<FieldError>> {
    let mut errors = Errors::default();
    let meter = match (raw.meter, raw.metric_type) {
        (Some(m), None) => Some(("meter", m)),
        (None, Some(m)) => Some(("metric_type", m)),
        (Some(m), Some(t)) if m == t => Some(("meter", m)),
        (Some(_), Some(_)) => {
            errors.push(
                "metric_type",
                "is another name for meter and differs from it: give one of them",
            );
            None
        }
        (None, None) => {
            errors.push("meter", "is required");
            None
        }
    };
    if let Some((field, name)) = &meter {
        // The same rule as a meter's name (SPEC §4): a book may be created before its meter.
        for e in Meter::default_for(name)
            .validate()
            .err()
            .unwrap_or_default()
        {
            if e.field == "meter" {
                errors.push(*field, e.message);
            }
        }
    }
    if let Some(customer) = &raw.customer_id {
        // The same rule as an event's customer_id (SPEC §2), so the book can match the customer's events.
        let id_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-');
        if customer.is_empty() || customer.len() > 128 {
            errors.push(
                "customer_id",
                "must be 1 to 128 characters long, or null for the default book",
            );
        } else if !customer.bytes().all(id_char) {
            errors.push("customer_id", "may only contain [A-Za-z0-9._:-]");
        }
    }
    let currency = raw.currency.unwrap_or_else(|| DEFAULT_CURRENCY.to_owned());
    if !is_currency(&currency) {
        errors.push(
            "currency",
            "must be an active ISO 4217 code in upper case, such as USD or EUR",
        );
    }
    let from = match raw.effective_from.as_deref() {
        None => {
            errors.push("effective_from", "is required");
            None
        }
        Some(text) => errors.start("effective_from", text),
    };
    let to = raw
        .effective_to
        .as_deref()
        .and_then(|text| errors.end("effective_to", text));
    if let (Some(from), Some(to)) = (from, to) {
        if to <= from {
            errors.push("effective_to", "must be after effective_from");
        }
    }
    let card = raw.entries.is_some();
    if card && (raw.model.is_some() || raw.unit_price.is_some() || raw.dimensions.is_some()) {
        errors.push(
            "entries",
            "a rate card's prices and selectors are its entries: give either entries, or model \
             (or unit_price) with dimensions, not both",
        );
    }
    let entries = raw
        .entries
        .as_deref()
        .and_then(|list| errors.entries(list))
        .unwrap_or_default();
    let model = match (raw.model, raw.unit_price) {
        _ if card => entries.first().map(|e| e.model.clone()),
        (Some(model), None) => errors.model(&model),
        (None, Some(price)) => errors
            .required_decimal("unit_price", Some(&price))
            .and_then(|unit_price| {
                let model = PriceModel::PerUnit { unit_price };
                let bad = model.validate();
                for e in &bad {
                    errors.push(e.field.trim_start_matches("model."), e.message.clone());
                }
                bad.is_empty().then_some(model)
            }),
        (Some(_), Some(_)) => {
            errors.push(
                "unit_price",
                "is the shorthand for a per_unit model: give either it or model, not both",
            );
            None
        }
        (None, None) => {
            errors.push(
                "model",
                "is required (or the shorthand unit_price for a per-unit price)",
            );
            None
        }
    };
    let minimum_per_period = raw
        .minimum_per_period
        .as_ref()
        .and_then(|v| errors.minimum(v));
    let dimensions = match raw.dimensions.as_ref().map(selector).transpose() {
        Ok(d) => d.unwrap_or_default(),
        Err(e) => {
            errors.push(e.field, e.message);
            Dimensions::default()
        }
    };
    errors.finish()?;
    match (meter, from, model) {
        (Some((_, meter)), Some(effective_from), Some(model)) => Ok(PriceBook {
            price_book_id,
            meter,
            customer_id: raw.customer_id,
            dimensions,
            currency,
            effective_from,
            effective_to: to,
            model,
            minimum_per_period,
            entries,
        }),
        // Each of these reported an error above.
        _ => Err(vec![FieldError::new("", "the book is incomplete")]),
    }
}

/// Field errors collected while reading a body, each with its path.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(field, message));
    }

    fn finish(self) -> Result<(), Vec<FieldError>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }

    /// A decimal given as a JSON number or a string, parsed exactly (never through f64).
    fn decimal(&mut self, field: &str, value: &Value) -> Option<Decimal> {
        let parsed = match value {
            Value::Number(n) => parse_decimal(&n.to_string()),
            Value::String(s) => parse_decimal(s),
            _ => Err("must be a decimal number (a JSON number or a string)"),
        };
        parsed.map_err(|why| self.push(field, why)).ok()
    }

    fn required_decimal(&mut self, field: &str, value: Option<&Value>) -> Option<Decimal> {
        match value {
            None | Some(Value::Null) => {
                self.push(field, "is required");
                None
            }
            Some(v) => self.decimal(field, v),
        }
    }

    fn minimum(&mut self, value: &Value) -> Option<Decimal> {
        let minimum = self.decimal("minimum_per_period", value)?;
        if minimum.is_sign_negative() && !minimum.is_zero() {
            self.push("minimum_per_period", "must not be negative");
            return None;
        }
        Some(minimum)
    }

    /// A start instant in microseconds.
    fn start(&mut self, field: &str, text: &str) -> Option<i64> {
        match parse_rfc3339(text) {
            Some(t) => Some(t.timestamp_micros()),
            None => {
                self.push(
                    field,
                    "must be an RFC 3339 timestamp with an offset, such as 2024-01-01T00:00:00Z",
                );
                None
            }
        }
    }

    /// An exclusive end instant in microseconds (`…T23:59:59.999Z` is the instant that follows).
    fn end(&mut self, field: &str, text: &str) -> Option<i64> {
        match parse_rfc3339(text) {
            Some(t) => Some(exclusive_end(t).timestamp_micros()),
            None => {
                self.push(
                    field,
                    "must be an RFC 3339 timestamp with an offset, such as 2024-02-01T00:00:00Z",
                );
                None
            }
        }
    }

    /// A rate card's entries: 1 to [`MAX_ENTRIES`], each selector once, each model checked, every
    /// error under `entries[i].`.
    fn entries(&mut self, list: &[RawEntry]) -> Option<Vec<RateEntry>> {
        if list.is_empty() || list.len() > MAX_ENTRIES {
            self.push(
                "entries",
                format!("must list 1 to {MAX_ENTRIES} entries (more: split the meter's prices over cards by customer or time)"),
            );
            return None;
        }
        let mut entries = Vec::with_capacity(list.len());
        let mut seen = std::collections::BTreeSet::new();
        for (i, raw) in list.iter().enumerate() {
            let mut own = Errors::default();
            let dimensions = match raw.dimensions.as_ref().map(selector).transpose() {
                Ok(d) => Some(d.unwrap_or_default()),
                Err(e) => {
                    own.push(e.field, e.message);
                    None
                }
            };
            let model = match &raw.model {
                Some(model) => own.model(model),
                None => {
                    own.push("model", format!("is required: {MODEL_TYPES}"));
                    None
                }
            };
            for e in own.0 {
                self.push(format!("entries[{i}].{}", e.field), e.message);
            }
            if let (Some(dimensions), Some(model)) = (dimensions, model) {
                if !seen.insert(dimensions.clone()) {
                    self.push(
                        format!("entries[{i}].dimensions"),
                        "names the same values as an earlier entry: each selector once",
                    );
                }
                entries.push(RateEntry { dimensions, model });
            }
        }
        (entries.len() == list.len()).then_some(entries)
    }

    /// A model, checked field by field under `model.`.
    fn model(&mut self, raw: &RawModel) -> Option<PriceModel> {
        let takes: &[&str] = match raw.kind.as_deref() {
            Some("per_unit") => &["unit_price"],
            Some("graduated" | "volume") => &["tiers"],
            Some("package") => &["package_size", "package_price"],
            Some(_) => {
                self.push("model.type", format!("must be {MODEL_TYPES}"));
                return None;
            }
            None => {
                self.push("model.type", format!("is required: {MODEL_TYPES}"));
                return None;
            }
        };
        let kind = raw.kind.as_deref().unwrap_or_default();
        let given = [
            ("unit_price", raw.unit_price.is_some()),
            ("tiers", raw.tiers.is_some()),
            ("package_size", raw.package_size.is_some()),
            ("package_price", raw.package_price.is_some()),
        ];
        let before = self.0.len();
        for (name, present) in given {
            if present && !takes.contains(&name) {
                self.push(
                    format!("model.{name}"),
                    format!("is not a field of a {kind} model"),
                );
            }
        }
        let model = match kind {
            "per_unit" => self
                .required_decimal("model.unit_price", raw.unit_price.as_ref())
                .map(|unit_price| PriceModel::PerUnit { unit_price }),
            "package" => {
                let size = self.required_decimal("model.package_size", raw.package_size.as_ref());
                let price =
                    self.required_decimal("model.package_price", raw.package_price.as_ref());
                size.zip(price)
                    .map(|(package_size, package_price)| PriceModel::Package {
                        package_size,
                        package_price,
                    })
            }
            _ => self.tiers(raw.tiers.as_deref()).map(|tiers| {
                if kind == "graduated" {
                    PriceModel::Graduated { tiers }
                } else {
                    PriceModel::Volume { tiers }
                }
            }),
        };
        let model = model.filter(|_| self.0.len() == before)?;
        let bad = model.validate();
        let valid = bad.is_empty();
        self.0.extend(bad);
        valid.then_some(model)
    }

    fn tiers(&mut self, raw: Option<&[RawTier]>) -> Option<Vec<Tier>> {
        let Some(raw) = raw else {
            self.push("model.tiers", "is required");
            return None;
        };
        let before = self.0.len();
        let tiers: Vec<Tier> = raw
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                let path = |name: &str| format!("model.tiers[{i}].{name}");
                let up_to = match &t.up_to {
                    None | Some(Value::Null) => Some(None),
                    Some(v) => self.decimal(&path("up_to"), v).map(Some),
                };
                let unit_price = self.required_decimal(&path("unit_price"), t.unit_price.as_ref());
                let flat_fee = match &t.flat_fee {
                    None | Some(Value::Null) => Some(Decimal::ZERO),
                    Some(v) => self.decimal(&path("flat_fee"), v),
                };
                Some(Tier {
                    up_to: up_to?,
                    unit_price: unit_price?,
                    flat_fee: flat_fee?,
                })
            })
            .collect();
        (self.0.len() == before).then_some(tiers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_patch_schema_names_the_fields_the_parser_takes() {
        use crate::openapi::schema_properties;
        let documented = schema_properties::<PatchFields>();
        let sample = |key: &str| match key {
            "model" => json!({"type": "per_unit", "unit_price": 1}),
            "entries" => {
                json!([{"dimensions": {}, "model": {"type": "per_unit", "unit_price": 1}}])
            }
            _ => Value::Null,
        };
        let accepted = |key: &str| {
            let mut body = Map::new();
            body.insert(key.into(), sample(key));
            Patch::parse(body).is_ok()
        };
        for key in &documented {
            assert!(
                accepted(key),
                "{key} is in the schema but the parser refuses it"
            );
        }
        for key in schema_properties::<super::super::PriceBookView>() {
            assert_eq!(
                accepted(&key),
                documented.contains(&key),
                "{key}: the parser and the schema disagree"
            );
        }
    }

    fn resolved(body: Value) -> Result<PriceBook, Vec<String>> {
        let raw: NewPriceBook = serde_json::from_value(body).unwrap();
        resolve(raw, "pb_test".into()).map_err(|e| e.into_iter().map(|e| e.field).collect())
    }

    #[test]
    fn the_seeds_shape_is_a_per_unit_book_in_usd() {
        let book = resolved(json!({"metric_type": "api_calls",
            "effective_from": "2024-01-15T00:00:00Z", "unit_price": 0.08}))
        .unwrap();
        assert_eq!(book.meter, "api_calls");
        assert_eq!(book.currency, "USD");
        assert_eq!(
            book.model,
            PriceModel::PerUnit {
                unit_price: Decimal::new(8, 2)
            }
        );
        assert_eq!(book.effective_to, None);
    }

    #[test]
    fn every_bad_field_is_reported_with_its_path() {
        let fields = resolved(
            json!({"meter": "Bad Meter", "customer_id": "", "currency": "usd",
            "effective_from": "2024-02-01T00:00:00Z", "effective_to": "2024-01-31T23:59:59.999Z",
            "model": {"type": "graduated", "tiers": [
                {"up_to": "10", "unit_price": "abc"},
                {"up_to": 5, "unit_price": "-1", "flat_fee": true}]},
            "minimum_per_period": "-5"}),
        )
        .unwrap_err();
        assert_eq!(
            fields,
            [
                "meter",
                "customer_id",
                "currency",
                "effective_to",
                "model.tiers[0].unit_price",
                "model.tiers[1].flat_fee",
                "minimum_per_period"
            ]
        );
    }

    #[test]
    fn a_models_values_are_checked_once_its_fields_parse() {
        let fields = resolved(
            json!({"meter": "m", "effective_from": "2024-01-01T00:00:00Z",
            "model": {"type": "volume", "tiers": [
                {"up_to": "10", "unit_price": "1"}, {"up_to": "5", "unit_price": "-1"}]}}),
        )
        .unwrap_err();
        assert_eq!(
            fields,
            ["model.tiers[1].up_to", "model.tiers[1].unit_price"]
        );
        let fields = resolved(
            json!({"meter": "m", "effective_from": "2024-01-01T00:00:00Z",
            "model": {"type": "package", "package_size": 0, "unit_price": 1}}),
        )
        .unwrap_err();
        assert_eq!(fields, ["model.unit_price", "model.package_price"]);
    }

    #[test]
    fn decimals_keep_their_digits_whether_numbers_or_strings() {
        let body = serde_json::from_str(
            r#"{"meter": "m", "effective_from": "2024-01-01T00:00:00Z",
                "model": {"type": "per_unit", "unit_price": 0.0012345678901234567890123},
                "minimum_per_period": "5.00"}"#,
        )
        .unwrap();
        let book = resolved(body).unwrap();
        let json = super::super::model_json(&book.model).to_string();
        assert_eq!(
            json,
            r#"{"type":"per_unit","unit_price":0.0012345678901234567890123}"#
        );
        assert_eq!(book.minimum_per_period.unwrap().to_string(), "5.00");
    }

    #[test]
    fn a_patch_may_change_only_the_model_the_minimum_and_the_end() {
        let fields = |body: Value| match Patch::parse(serde_json::from_value(body).unwrap()) {
            Err(ApiError::Validation(e)) => {
                let mut fields: Vec<String> = e.into_iter().map(|e| e.field).collect();
                fields.sort();
                fields
            }
            Err(other) => panic!("{other}"),
            Ok(_) => vec![],
        };
        assert_eq!(
            fields(json!({"currency": "EUR", "colour": "blue"})),
            ["colour", "currency"]
        );
        assert!(fields(json!({"effective_to": null, "minimum_per_period": 1})).is_empty());
        let patch = Patch::parse(
            serde_json::from_value(json!({"effective_to": "2024-01-01T00:00:00Z"})).unwrap(),
        )
        .unwrap();
        let book = resolved(
            json!({"meter": "m", "effective_from": "2024-01-01T00:00:00Z",
            "unit_price": 1}),
        )
        .unwrap();
        let refused = patch.apply(&book).unwrap_err();
        assert_eq!(refused[0].field, "effective_to");
    }
}
