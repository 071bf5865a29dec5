//! Price books and period-to-date rating (SPEC §5): what a quantity costs under a [`PriceModel`], which
//! [`PriceBook`] prices a window, and [`rate_period`], the one function that turns a billing period's
//! window usage into window charges. The dataflow and the re-rating jobs both call it.
//!
//! ```text
//!  windows of one (customer, meter, calendar month), in time order
//!    w1 ─► ptd₁ = fold(w1)          charge(w1) = b(w1).price(ptd₁) − b(w1).price(0)
//!    w2 ─► ptd₂ = fold(w1, w2)      charge(w2) = b(w2).price(ptd₂) − b(w2).price(ptd₁)
//!    …                              Σ charges = price(period quantity) when one book covers the period
//! ```
//! `ptd` is the period-to-date quantity: the running total (count, sum), the running maximum (max), the
//! number of distinct values so far (unique_count) or the latest value so far (latest). It counts all
//! usage, priced or not; a window no book covers has no charge.
//!
//! Length: 180 of its lines are unit tests; the price models and `rate_period` are read together,
//! since rating is the one place the models are applied.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Datelike, NaiveDate};
use compact_str::CompactString;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::dimensions::{specificity, Dimensions};
use crate::event::FieldError;
use crate::meter::{Item, Latest};
use crate::money::{self, MoneyError};

/// One tier of a graduated or volume model. `up_to` is inclusive; `None` is the last, open tier.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Tier {
    pub up_to: Option<Decimal>,
    pub unit_price: Decimal,
    /// Charged once when any unit falls in the tier (graduated) or when the total does (volume).
    #[serde(default)]
    pub flat_fee: Decimal,
}

/// How a quantity is priced (SPEC §5).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PriceModel {
    /// Every unit at one price.
    PerUnit { unit_price: Decimal },
    /// Each unit priced in the tier it falls in.
    Graduated { tiers: Vec<Tier> },
    /// All units priced at the tier the total falls in.
    Volume { tiers: Vec<Tier> },
    /// Whole packages, rounded up.
    Package {
        package_size: Decimal,
        package_price: Decimal,
    },
}

impl PriceModel {
    /// What `quantity` costs in total. Quantities at or below zero cost nothing.
    pub fn price(&self, quantity: Decimal) -> Result<Decimal, MoneyError> {
        if quantity <= Decimal::ZERO {
            return Ok(Decimal::ZERO);
        }
        match self {
            PriceModel::PerUnit { unit_price } => money::mul(quantity, *unit_price),
            PriceModel::Graduated { tiers } => graduated(tiers, Decimal::ZERO, quantity),
            PriceModel::Volume { tiers } => {
                let tier = tiers
                    .iter()
                    .find(|t| t.up_to.is_none_or(|up| quantity <= up))
                    .or(tiers.last())
                    .ok_or(MoneyError)?;
                money::add(money::mul(quantity, tier.unit_price)?, tier.flat_fee)
            }
            PriceModel::Package {
                package_size,
                package_price,
            } => {
                if package_size.is_zero() {
                    return Err(MoneyError);
                }
                // The quotient is rounded to 28 digits before `ceil`: correct it by one package
                // either way so `packages` is exactly the least n with n × size ≥ quantity.
                let mut packages = quantity
                    .checked_div(*package_size)
                    .ok_or(MoneyError)?
                    .ceil();
                if money::mul(packages, *package_size)? < quantity {
                    packages = money::add(packages, Decimal::ONE)?;
                } else if packages > Decimal::ONE
                    && money::mul(money::sub(packages, Decimal::ONE)?, *package_size)? >= quantity
                {
                    packages = money::sub(packages, Decimal::ONE)?;
                }
                money::mul(packages, *package_price)
            }
        }
    }

    /// What going from `from` to `from + add` costs: `price(from + add) − price(from)`. Graduated tiers
    /// compute it from the tiers the added units fall in.
    pub fn marginal(&self, from: Decimal, add: Decimal) -> Result<Decimal, MoneyError> {
        let to = money::add(from, add)?;
        match self {
            PriceModel::Graduated { tiers } if from >= Decimal::ZERO && add >= Decimal::ZERO => {
                graduated(tiers, from, to)
            }
            _ => money::sub(self.price(to)?, self.price(from)?),
        }
    }

    /// Checks a model, reporting every bad field by its path under `model`.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let negative = |d: &Decimal| d.is_sign_negative() && !d.is_zero();
        match self {
            PriceModel::PerUnit { unit_price } => {
                if negative(unit_price) {
                    errors.push(FieldError::new("model.unit_price", "must not be negative"));
                }
            }
            PriceModel::Graduated { tiers } | PriceModel::Volume { tiers } => {
                if tiers.is_empty() {
                    errors.push(FieldError::new(
                        "model.tiers",
                        "must have at least one tier",
                    ));
                }
                let mut previous = Decimal::ZERO;
                for (i, tier) in tiers.iter().enumerate() {
                    let last = i == tiers.len().saturating_sub(1);
                    match (tier.up_to, last) {
                        (None, false) => errors.push(FieldError::new(
                            format!("model.tiers[{i}].up_to"),
                            "only the last tier may be open (null)",
                        )),
                        (Some(_), true) => errors.push(FieldError::new(
                            format!("model.tiers[{i}].up_to"),
                            "the last tier must be open (null)",
                        )),
                        (Some(up), false) if up <= previous => errors.push(FieldError::new(
                            format!("model.tiers[{i}].up_to"),
                            "must be greater than the previous tier's",
                        )),
                        (Some(up), false) => previous = up,
                        (None, true) => {}
                    }
                    if negative(&tier.unit_price) {
                        errors.push(FieldError::new(
                            format!("model.tiers[{i}].unit_price"),
                            "must not be negative",
                        ));
                    }
                    if negative(&tier.flat_fee) {
                        errors.push(FieldError::new(
                            format!("model.tiers[{i}].flat_fee"),
                            "must not be negative",
                        ));
                    }
                }
            }
            PriceModel::Package {
                package_size,
                package_price,
            } => {
                if *package_size <= Decimal::ZERO {
                    errors.push(FieldError::new("model.package_size", "must be positive"));
                }
                if negative(package_price) {
                    errors.push(FieldError::new(
                        "model.package_price",
                        "must not be negative",
                    ));
                }
            }
        }
        errors
    }
}

/// The graduated price of the units in `(from, to]`, with the flat fee of every tier entered on the way.
fn graduated(tiers: &[Tier], from: Decimal, to: Decimal) -> Result<Decimal, MoneyError> {
    let mut total = Decimal::ZERO;
    let mut lower = Decimal::ZERO;
    for tier in tiers {
        let upper = tier.up_to;
        let lo = lower.max(from);
        let hi = upper.map_or(to, |u| u.min(to));
        if hi > lo {
            total = money::add(total, money::mul(money::sub(hi, lo)?, tier.unit_price)?)?;
            // The tier's first unit lies in the added range: its flat fee is added now.
            if from <= lower {
                total = money::add(total, tier.flat_fee)?;
            }
        }
        match upper {
            Some(u) if u < to => lower = u,
            _ => break,
        }
    }
    Ok(total)
}

/// A price book (SPEC §5): a model for one meter over a half-open range of time, for all customers
/// (`customer_id: None`) or one, and for the windows of every dimension value (`dimensions` empty) or
/// of those whose values match its selector (issue 17, `docs/dimensions.md`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PriceBook {
    pub price_book_id: String,
    pub meter: String,
    pub customer_id: Option<String>,
    /// The selector: the dimension values a window must have for the book to price it (`{}`: all).
    #[serde(default, skip_serializing_if = "Dimensions::is_empty")]
    pub dimensions: Dimensions,
    /// ISO 4217 code.
    pub currency: String,
    /// Microseconds since the epoch, inclusive.
    pub effective_from: i64,
    /// Microseconds since the epoch, exclusive; `None` is open-ended.
    pub effective_to: Option<i64>,
    pub model: PriceModel,
    pub minimum_per_period: Option<Decimal>,
    /// A rate card's entries; empty for a plain book. A card prices only through its entries:
    /// [`PriceBook::priced`] turns it into one plain book per entry, each with the card's id, scope,
    /// currency, range and minimum. A card's own `dimensions` are `{}` and its `model` is its first
    /// entry's (the stored row's `model` is never null); neither prices anything by itself, and
    /// [`book_for`] passes a card over.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<RateEntry>,
}

/// One entry of a rate card: the windows it prices (a selector, as a book's `dimensions`) and how.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RateEntry {
    pub dimensions: Dimensions,
    pub model: PriceModel,
}

impl PriceBook {
    /// Is this a rate card (a book of entries)?
    pub fn is_card(&self) -> bool {
        !self.entries.is_empty()
    }

    /// Makes the book a rate card of `entries` (its `model` the first entry's, its own selector `{}`).
    pub fn set_entries(&mut self, entries: Vec<RateEntry>) {
        if let Some(first) = entries.first() {
            self.model = first.model.clone();
            self.dimensions = Dimensions::default();
        }
        self.entries = entries;
    }

    /// The plain books that price: the book itself, or a card's entries, each as a book with the
    /// card's id. This is what rating, re-rating and the pipeline see.
    pub fn priced(&self) -> Vec<PriceBook> {
        if !self.is_card() {
            return vec![self.clone()];
        }
        self.entries
            .iter()
            .map(|entry| PriceBook {
                dimensions: entry.dimensions.clone(),
                model: entry.model.clone(),
                entries: Vec::new(),
                ..self.clone()
            })
            .collect()
    }

    /// The selectors the book holds against the other books of its meter and scope: its own, or
    /// each entry's. Two books (or entries) with one selector may not overlap in time.
    pub fn selectors(&self) -> Vec<&Dimensions> {
        if self.is_card() {
            self.entries.iter().map(|e| &e.dimensions).collect()
        } else {
            vec![&self.dimensions]
        }
    }

    /// Is the book in force at `micros`?
    pub fn covers(&self, micros: i64) -> bool {
        self.effective_from <= micros && self.effective_to.is_none_or(|to| micros < to)
    }

    /// Does the book's range meet `[from, to)` (microseconds)?
    pub fn overlaps(&self, from: i64, to: i64) -> bool {
        self.effective_from < to && self.effective_to.is_none_or(|end| from < end)
    }
}

/// The book that prices `customer`'s usage of a window of `dimensions` starting at `window_start`
/// (seconds): of the books in force then whose scope is the customer or everyone and whose selector
/// the window's values match, the most specific (`dimensions::specificity`: the customer's own before
/// a default, then more keys named before fewer). `books` are the meter's. Two books equally specific
/// for one window cannot both be in force: Postgres refuses the overlap per (meter, scope, selector).
pub fn book_for<'a>(
    books: impl IntoIterator<Item = &'a PriceBook>,
    customer: &str,
    dimensions: &Dimensions,
    window_start: i64,
) -> Option<&'a PriceBook> {
    let at = window_start.saturating_mul(1_000_000);
    books
        .into_iter()
        .filter(|b| !b.is_card())
        .filter(|b| b.covers(at) && b.customer_id.as_deref().is_none_or(|c| c == customer))
        .filter(|b| dimensions.matches(&b.dimensions))
        .max_by_key(|b| {
            (
                specificity(b.customer_id.is_some(), &b.dimensions),
                // Equally specific (two selectors naming different keys, both matching): the
                // selector first in key order, then the first id, so every path picks the same.
                std::cmp::Reverse((&b.dimensions, &b.price_book_id)),
            )
        })
}

/// The entry of a rate card that prices a window of `dimensions`: of those whose selector the values
/// match, the most specific by [`book_for`]'s rule (`specificity`; the entries share the card's
/// scope), ties to the selector first in key order, as [`book_for`] chooses among the card's books.
pub fn entry_for<'a>(entries: &'a [RateEntry], dimensions: &Dimensions) -> Option<&'a RateEntry> {
    entries
        .iter()
        .filter(|e| dimensions.matches(&e.dimensions))
        .max_by_key(|e| {
            (
                specificity(false, &e.dimensions),
                std::cmp::Reverse(&e.dimensions),
            )
        })
}

/// The billing period (calendar month, UTC) holding `seconds`: `[start, end)` in seconds.
pub fn period_of(seconds: i64) -> (i64, i64) {
    let date = DateTime::from_timestamp(seconds, 0)
        .unwrap_or_default()
        .date_naive();
    let start = NaiveDate::from_ymd_opt(date.year(), date.month(), 1).unwrap_or_default();
    let end = start
        .checked_add_months(chrono::Months::new(1))
        .unwrap_or(start);
    let secs = |d: NaiveDate| {
        d.and_hms_opt(0, 0, 0)
            .unwrap_or_default()
            .and_utc()
            .timestamp()
    };
    (secs(start), secs(end))
}

/// One window's usage as rating needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Measure {
    /// count and sum: the window's total.
    Total(Decimal),
    /// max: the window's maximum.
    Max(Decimal),
    /// unique_count: the window's distinct values.
    Unique(Vec<String>),
    /// latest: the window's latest (time, event_id) and its value.
    Latest {
        time_micros: i64,
        event_id: String,
        value: Decimal,
    },
}

impl Measure {
    fn latest(item: &Latest) -> Measure {
        Measure::Latest {
            time_micros: item.time_micros,
            event_id: item.event_id.clone(),
            value: item.value,
        }
    }

    /// The window's measure from its multiset of items (each with a positive count), or from its total
    /// when it has none. `None` when the items cancel out.
    pub fn from_items<'a>(
        total: Decimal,
        items: impl IntoIterator<Item = &'a Item>,
    ) -> Option<Measure> {
        let mut measure: Option<Measure> = None;
        for item in items {
            measure = Some(match (measure, item) {
                (Some(Measure::Max(m)), Item::Max(v)) => Measure::Max(m.max(*v)),
                (_, Item::Max(v)) => Measure::Max(*v),
                (Some(Measure::Unique(mut values)), Item::Unique(v)) => {
                    values.push(v.clone());
                    Measure::Unique(values)
                }
                (_, Item::Unique(v)) => Measure::Unique(vec![v.clone()]),
                (
                    Some(Measure::Latest {
                        time_micros,
                        event_id,
                        value,
                    }),
                    Item::Latest(latest),
                ) => {
                    if (latest.time_micros, &latest.event_id) > (time_micros, &event_id) {
                        Measure::latest(latest)
                    } else {
                        Measure::Latest {
                            time_micros,
                            event_id,
                            value,
                        }
                    }
                }
                (_, Item::Latest(latest)) => Measure::latest(latest),
            });
        }
        measure.or(Some(Measure::Total(total)))
    }
}

/// One window of a period, with its usage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowUsage {
    pub window_start: i64,
    pub window_end: i64,
    pub measure: Measure,
}

/// A window's charge (SPEC §5), unrounded. `quantity` is what the window added to the period-to-date
/// quantity, so a period's quantities add up to its quantity as its amounts add up to its price.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Charge {
    /// The window's dimension values (`{}` for a meter without `group_by`).
    pub dimensions: Dimensions,
    pub window_start: i64,
    pub window_end: i64,
    pub quantity: Decimal,
    pub amount: Decimal,
    pub currency: CompactString,
    pub price_book_id: CompactString,
}

/// Period-to-date state while walking a period's windows in time order.
#[derive(Default)]
struct PeriodToDate {
    quantity: Decimal,
    seen: HashSet<String>,
    latest: Option<(i64, String)>,
}

impl PeriodToDate {
    /// Takes in one window; returns the period-to-date quantity after it.
    fn take(&mut self, measure: &Measure) -> Result<Decimal, MoneyError> {
        match measure {
            Measure::Total(v) => self.quantity = money::add(self.quantity, *v)?,
            Measure::Max(v) => self.quantity = self.quantity.max(*v),
            Measure::Unique(values) => {
                for v in values {
                    if self.seen.insert(v.clone()) {
                        self.quantity = money::add(self.quantity, Decimal::ONE)?;
                    }
                }
            }
            Measure::Latest {
                time_micros,
                event_id,
                value,
            } => {
                let newer = self
                    .latest
                    .as_ref()
                    .is_none_or(|(t, id)| (time_micros, event_id) > (t, id));
                if newer {
                    self.latest = Some((*time_micros, event_id.clone()));
                    self.quantity = *value;
                }
            }
        }
        Ok(self.quantity)
    }
}

/// Rates one customer's usage of one meter's windows of `dimensions` over one billing period: `windows` (any order, all in the
/// period), `books` the meter's books (default and the customer's). Windows no book covers add to the
/// period-to-date quantity but get no charge.
pub fn rate_period(
    customer: &str,
    dimensions: &Dimensions,
    windows: &[WindowUsage],
    books: &[&PriceBook],
) -> Result<Vec<Charge>, MoneyError> {
    rate_period_from(customer, dimensions, windows, books, i64::MIN)
}

/// [`rate_period`]'s charges of the windows that start at or after `from` only: the earlier windows
/// still make up the period-to-date quantity, but are not priced. A window's charge depends only on
/// the windows up to it, so when nothing before `from` changed, these are all the charges that can
/// have moved. `windows` in time order, each start once; any other order is sorted first.
pub fn rate_period_from(
    customer: &str,
    dimensions: &Dimensions,
    windows: &[WindowUsage],
    books: &[&PriceBook],
    from: i64,
) -> Result<Vec<Charge>, MoneyError> {
    let ptd = PeriodToDate::default();
    if windows.is_sorted_by(|a, b| a.window_start < b.window_start) {
        return rate_ordered(customer, dimensions, windows.iter(), books, from, ptd);
    }
    let ordered: BTreeMap<i64, &WindowUsage> =
        windows.iter().map(|w| (w.window_start, w)).collect();
    rate_ordered(
        customer,
        dimensions,
        ordered.into_values(),
        books,
        from,
        ptd,
    )
}

/// [`rate_period`]'s charges of `windows`, the last windows of a period of totals (a sum or count
/// meter's), when the windows before them add up to `quantity_before`: what
/// [`rate_period_from`] gives from the first of `windows`, without the earlier windows. A window's
/// charge depends on the earlier windows only through their total. `windows` in time order, each
/// start once, every measure a [`Measure::Total`].
pub fn rate_totals_after(
    customer: &str,
    dimensions: &Dimensions,
    quantity_before: Decimal,
    windows: &[WindowUsage],
    books: &[&PriceBook],
) -> Result<Vec<Charge>, MoneyError> {
    let ptd = PeriodToDate {
        quantity: quantity_before,
        ..PeriodToDate::default()
    };
    rate_ordered(customer, dimensions, windows.iter(), books, i64::MIN, ptd)
}

/// Walks `windows` in time order from `ptd`, pricing those from `from` on.
fn rate_ordered<'w>(
    customer: &str,
    dimensions: &Dimensions,
    windows: impl ExactSizeIterator<Item = &'w WindowUsage>,
    books: &[&PriceBook],
    from: i64,
    mut ptd: PeriodToDate,
) -> Result<Vec<Charge>, MoneyError> {
    let mut charges = Vec::with_capacity(windows.len());
    for window in windows {
        let before = ptd.quantity;
        let including = ptd.take(&window.measure)?;
        if window.window_start < from {
            continue;
        }
        let Some(book) = book_for(
            books.iter().copied(),
            customer,
            dimensions,
            window.window_start,
        ) else {
            continue;
        };
        charges.push(Charge {
            dimensions: dimensions.clone(),
            window_start: window.window_start,
            window_end: window.window_end,
            quantity: money::sub(including, before)?,
            amount: money::sub(book.model.price(including)?, book.model.price(before)?)?,
            currency: CompactString::from(book.currency.as_str()),
            price_book_id: CompactString::from(book.price_book_id.as_str()),
        });
    }
    Ok(charges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn tiers() -> Vec<Tier> {
        vec![
            Tier {
                up_to: Some(d("1000")),
                unit_price: d("0.01"),
                flat_fee: d("0"),
            },
            Tier {
                up_to: None,
                unit_price: d("0.005"),
                flat_fee: d("1"),
            },
        ]
    }

    #[test]
    fn graduated_prices_each_unit_in_its_tier() {
        let m = PriceModel::Graduated { tiers: tiers() };
        assert_eq!(m.price(d("1000")).unwrap(), d("10"));
        assert_eq!(m.price(d("1500")).unwrap(), d("10") + d("2.5") + d("1"));
        assert_eq!(
            m.marginal(d("900"), d("200")).unwrap(),
            d("1") + d("0.5") + d("1")
        );
    }

    #[test]
    fn volume_prices_every_unit_at_the_tier_of_the_total() {
        let m = PriceModel::Volume { tiers: tiers() };
        assert_eq!(m.price(d("1000")).unwrap(), d("10"));
        assert_eq!(m.price(d("1001")).unwrap(), d("5.005") + d("1"));
    }

    #[test]
    fn packages_round_up() {
        let m = PriceModel::Package {
            package_size: d("100"),
            package_price: d("3"),
        };
        assert_eq!(m.price(d("1")).unwrap(), d("3"));
        assert_eq!(m.price(d("100")).unwrap(), d("3"));
        assert_eq!(m.price(d("100.5")).unwrap(), d("6"));
        assert_eq!(m.price(d("0")).unwrap(), d("0"));
    }

    #[test]
    fn a_period_is_its_calendar_month() {
        let t = DateTime::parse_from_rfc3339("2024-02-29T23:00:00Z")
            .unwrap()
            .timestamp();
        let (start, end) = period_of(t);
        assert_eq!(
            DateTime::from_timestamp(start, 0).unwrap().to_rfc3339(),
            "2024-02-01T00:00:00+00:00"
        );
        assert_eq!(
            DateTime::from_timestamp(end, 0).unwrap().to_rfc3339(),
            "2024-03-01T00:00:00+00:00"
        );
    }

    fn book(
        id: &str,
        customer: Option<&str>,
        from: i64,
        to: Option<i64>,
        price: &str,
    ) -> PriceBook {
        PriceBook {
            entries: Default::default(),
            dimensions: Default::default(),
            price_book_id: id.into(),
            meter: "m".into(),
            customer_id: customer.map(str::to_owned),
            currency: "USD".into(),
            effective_from: from * 1_000_000,
            effective_to: to.map(|t| t * 1_000_000),
            model: PriceModel::PerUnit {
                unit_price: d(price),
            },
            minimum_per_period: None,
        }
    }

    #[test]
    fn a_rate_card_prices_through_its_entries_each_a_book_with_the_cards_id() {
        let dims = |pairs: &[(&str, Option<&str>)]| {
            Dimensions::from_pairs(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.map(str::to_owned))),
            )
        };
        let entry = |pairs: &[(&str, Option<&str>)], price: &str| RateEntry {
            dimensions: dims(pairs),
            model: PriceModel::PerUnit {
                unit_price: d(price),
            },
        };
        let mut card = book("card", None, 0, None, "9");
        card.set_entries(vec![
            entry(&[("model", Some("large"))], "3"),
            entry(&[], "1"),
        ]);
        assert!(card.is_card());
        assert_eq!(card.selectors().len(), 2);
        // The card itself prices nothing; its entries, as books, do.
        let window = dims(&[("model", Some("large"))]);
        assert!(book_for([&card], "acme", &window, 10).is_none());
        let priced = card.priced();
        assert!(priced
            .iter()
            .all(|b| !b.is_card() && b.price_book_id == "card"));
        let chosen = book_for(&priced, "acme", &window, 10).unwrap();
        assert_eq!(chosen.model, entry(&[], "3").model);
        let other = dims(&[("model", Some("small"))]);
        assert_eq!(
            book_for(&priced, "acme", &other, 10).unwrap().model,
            entry(&[], "1").model
        );
        // entry_for picks the same entry as book_for does among the card's books.
        assert_eq!(
            entry_for(&card.entries, &window).unwrap().model,
            chosen.model
        );
        assert_eq!(
            entry_for(&card.entries, &other).unwrap().dimensions,
            Dimensions::default()
        );
    }

    #[test]
    fn a_customers_book_beats_the_default_and_ranges_are_half_open() {
        let default = book("d", None, 0, None, "1");
        let own = book("c", Some("acme"), 100, Some(200), "2");
        let books = [&default, &own];
        assert_eq!(
            book_for(books, "acme", &Dimensions::default(), 150)
                .unwrap()
                .price_book_id,
            "c"
        );
        assert_eq!(
            book_for(books, "acme", &Dimensions::default(), 200)
                .unwrap()
                .price_book_id,
            "d"
        );
        assert_eq!(
            book_for(books, "other", &Dimensions::default(), 150)
                .unwrap()
                .price_book_id,
            "d"
        );
    }

    #[test]
    fn the_most_specific_book_whose_selector_matches_prices_the_window() {
        let dims = |pairs: &[(&str, &str)]| {
            Dimensions::from_pairs(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), Some(v.to_string()))),
            )
        };
        let select = |b: PriceBook, pairs: &[(&str, &str)]| PriceBook {
            dimensions: dims(pairs),
            ..b
        };
        let default = book("d", None, 0, None, "1");
        let large = select(book("l", None, 0, None, "2"), &[("model", "large")]);
        let large_eu = select(
            book("le", None, 0, None, "3"),
            &[("model", "large"), ("region", "eu")],
        );
        let eu = select(book("eu", None, 0, None, "4"), &[("region", "eu")]);
        let acme = book("a", Some("acme"), 0, None, "5");
        let books = [&default, &large, &large_eu, &eu, &acme];
        let pick = |customer: &str, pairs: &[(&str, &str)]| {
            book_for(books, customer, &dims(pairs), 0)
                .unwrap()
                .price_book_id
                .clone()
        };
        assert_eq!(pick("x", &[("model", "small"), ("region", "us")]), "d");
        assert_eq!(pick("x", &[("model", "large"), ("region", "us")]), "l");
        assert_eq!(pick("x", &[("model", "large"), ("region", "eu")]), "le");
        assert_eq!(pick("x", &[("model", "small"), ("region", "eu")]), "eu");
        // The customer's own book, even with no selector, beats every default.
        assert_eq!(pick("acme", &[("model", "large"), ("region", "eu")]), "a");
        // Equally specific and both matching: the selector first in key order, on every path.
        let books = [&large, &eu];
        let got = book_for(
            books,
            "x",
            &dims(&[("model", "large"), ("region", "eu")]),
            0,
        );
        assert_eq!(got.unwrap().price_book_id, "l");
        // A window of a meter without group_by matches no selector.
        assert_eq!(book_for([&large], "x", &Dimensions::default(), 0), None);
    }

    /// Consecutive hourly windows from the epoch, each with its total.
    fn hourly(totals: &[i64]) -> Vec<WindowUsage> {
        totals
            .iter()
            .enumerate()
            .map(|(i, q)| WindowUsage {
                window_start: i as i64 * 3600,
                window_end: (i as i64 + 1) * 3600,
                measure: Measure::Total(Decimal::from(*q)),
            })
            .collect()
    }

    #[test]
    fn period_charges_add_up_to_the_tiered_price_of_the_period_in_any_order() {
        let b = PriceBook {
            model: PriceModel::Graduated { tiers: tiers() },
            ..book("g", None, 0, None, "0")
        };
        let windows = hourly(&[700, 400, 900]);
        let mut reversed = windows.clone();
        reversed.reverse();
        let charges = rate_period("c", &Dimensions::default(), &windows, &[&b]).unwrap();
        assert_eq!(
            charges,
            rate_period("c", &Dimensions::default(), &reversed, &[&b]).unwrap()
        );
        let total: Decimal = charges.iter().map(|c| c.amount).sum();
        assert_eq!(total, b.model.price(d("2000")).unwrap());
        assert_eq!(charges[1].quantity, d("400"));
    }

    #[test]
    fn rating_from_a_window_gives_the_charges_of_the_whole_period_from_it_on() {
        let b = PriceBook {
            model: PriceModel::Graduated { tiers: tiers() },
            ..book("g", None, 0, None, "0")
        };
        let totals = [700, 400, 900, 5];
        let windows = hourly(&totals);
        let mut reversed = windows.clone();
        reversed.reverse();
        let whole = rate_period("c", &Dimensions::default(), &windows, &[&b]).unwrap();
        for from in [i64::MIN, 0, 1, 3600, 7200, 10_800, 10_801, i64::MAX] {
            let suffix: Vec<Charge> = whole
                .iter()
                .filter(|c| c.window_start >= from)
                .cloned()
                .collect();
            for given in [&windows, &reversed] {
                assert_eq!(
                    rate_period_from("c", &Dimensions::default(), given, &[&b], from).unwrap(),
                    suffix,
                    "from {from}"
                );
            }
        }
        // The same from the windows after a split, given the total of those before it.
        for split in 0..=windows.len() {
            let before: i64 = totals.iter().take(split).sum();
            let after = windows.get(split..).unwrap_or_default();
            assert_eq!(
                rate_totals_after("c", &Dimensions::default(), before.into(), after, &[&b])
                    .unwrap(),
                whole.get(split..).unwrap_or_default(),
                "after {split} windows"
            );
        }
    }

    #[test]
    fn unpriced_windows_still_count_towards_the_period() {
        let b = book("late", None, 3600, None, "1");
        let b = PriceBook {
            model: PriceModel::Graduated { tiers: tiers() },
            ..b
        };
        let windows = vec![
            WindowUsage {
                window_start: 0,
                window_end: 3600,
                measure: Measure::Total(d("1000")),
            },
            WindowUsage {
                window_start: 3600,
                window_end: 7200,
                measure: Measure::Total(d("10")),
            },
        ];
        let charges = rate_period("c", &Dimensions::default(), &windows, &[&b]).unwrap();
        assert_eq!(charges.len(), 1);
        assert_eq!(charges[0].amount, d("0.05") + d("1"));
    }

    #[test]
    fn unique_counts_and_latest_values_rate_on_their_period_to_date_quantity() {
        let b = book("u", None, 0, None, "1");
        let unique = |start: i64, values: &[&str]| WindowUsage {
            window_start: start,
            window_end: start + 60,
            measure: Measure::Unique(values.iter().map(|v| v.to_string()).collect()),
        };
        let charges = rate_period(
            "c",
            &Dimensions::default(),
            &[unique(0, &["a", "b"]), unique(60, &["b", "c"])],
            &[&b],
        )
        .unwrap();
        assert_eq!(charges[1].amount, d("1"));
        let latest = |start: i64, value: &str| WindowUsage {
            window_start: start,
            window_end: start + 60,
            measure: Measure::Latest {
                time_micros: start * 1_000_000,
                event_id: "e".into(),
                value: d(value),
            },
        };
        let charges = rate_period(
            "c",
            &Dimensions::default(),
            &[latest(0, "5"), latest(60, "3")],
            &[&b],
        )
        .unwrap();
        assert_eq!(
            charges[1].amount,
            d("-2"),
            "a window charge may be negative"
        );
    }
}
