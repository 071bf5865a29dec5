//! Customers and invoices (SPEC §6): what an issued invoice holds. An issued invoice never changes;
//! later usage or price changes touching its period reach the customer's next invoice as adjustments.

use std::collections::{BTreeMap, BTreeSet};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::dimensions::Dimensions;
use crate::money::{self, minor_unit_digits, round_to_minor_unit, MoneyError};
use crate::price::PriceModel;

/// A registered customer. Usage of unregistered customers is counted and rated, but not invoiced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub customer_id: String,
    pub name: String,
    pub email: Option<String>,
    pub address: Option<String>,
    /// ISO 4217; a customer is billed in one currency.
    pub currency: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum InvoiceStatus {
    Issued,
    Void,
}

impl InvoiceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            InvoiceStatus::Issued => "issued",
            InvoiceStatus::Void => "void",
        }
    }
}

/// What a line bills.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum LineKind {
    /// The period's charges of one meter under one price book.
    Usage,
    /// The top-up to the book's `minimum_per_period` (SPEC §5).
    Minimum,
}

/// One line: a meter's usage under one price book in the period, rounded once to the currency's minor
/// unit, or the top-up to that book's minimum.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceLine {
    pub meter: String,
    /// The dimension values the line bills (`{}`, and absent, for a meter without `group_by`).
    #[serde(default, skip_serializing_if = "Dimensions::is_empty")]
    pub dimensions: Dimensions,
    pub kind: LineKind,
    pub description: String,
    pub quantity: Decimal,
    /// How the book prices, for people: "graduated: 0.01 up to 1000, then 0.005".
    pub unit_price_summary: String,
    pub amount: Decimal,
    pub price_book_id: String,
}

/// A correction of an earlier issued invoice's line (SPEC §6): `round(current unrounded amount) −
/// amount issued` (including earlier adjustments of the same line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adjustment {
    pub original_invoice_id: String,
    /// The period of the original invoice, seconds since the epoch.
    pub period_start: i64,
    pub meter: String,
    #[serde(default, skip_serializing_if = "Dimensions::is_empty")]
    pub dimensions: Dimensions,
    pub price_book_id: String,
    pub amount: Decimal,
    pub reason: String,
}

/// An issued (or voided) invoice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoice {
    pub invoice_id: String,
    /// Gapless per deployment: 1, 2, 3, … in issue order.
    pub number: i64,
    pub customer_id: String,
    /// Seconds since the epoch, half-open `[start, end)`.
    pub billing_period_start: i64,
    pub billing_period_end: i64,
    pub status: InvoiceStatus,
    pub currency: String,
    pub line_items: Vec<InvoiceLine>,
    pub adjustments: Vec<Adjustment>,
    /// Σ rounded line amounts.
    pub subtotal: Decimal,
    /// subtotal + Σ adjustments; may be negative (a credit).
    pub total: Decimal,
    /// Microseconds since the epoch.
    pub issued_at: i64,
}

// ── Invoice math (SPEC §5, §6): pure functions the issuing code and the upcoming invoice share ──────
//
//  period usage per (meter, book), unrounded ──► billed(line) = round(max(amount, minimum))
//     usage line   = round(amount)
//     minimum line = billed − round(amount)      (only when amount < minimum)
//  so a line's usage and top-up add up to exactly its rounded minimum, and an invoice's lines per
//  (meter, book) to `billed`, the same figure adjustments compare against later:
//     correction(period, meter, book) = billed(now) − (Σ issued lines + Σ issued adjustments)

/// One (meter, price book) of a customer's billing period as it stands now: the sum of its window
/// charges (unrounded) and the book's minimum — an `upcoming_lines` row and its book.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeriodUsage {
    pub meter: String,
    /// The dimension values of the windows it adds up.
    pub dimensions: Dimensions,
    pub price_book_id: String,
    pub currency: String,
    pub quantity: Decimal,
    /// Σ window charges, unrounded.
    pub amount: Decimal,
    /// The book's `minimum_per_period`, if it has one.
    pub minimum: Option<Decimal>,
    /// The book's prices for people (see [`price_summary`]).
    pub unit_price_summary: String,
}

/// Why an invoice cannot be computed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvoiceError {
    /// A line is priced in another currency than the customer is billed in.
    #[error(
        "usage of meter {meter} in {} is priced by book {price_book_id} in {line_currency}, but the \
         customer is billed in {customer_currency}: give the customer a price book in \
         {customer_currency} (or register the customer in {line_currency})",
        month(*.period_start)
    )]
    CurrencyMismatch {
        meter: String,
        price_book_id: String,
        /// Seconds since the epoch.
        period_start: i64,
        line_currency: String,
        customer_currency: String,
    },
    #[error(transparent)]
    Overflow(#[from] MoneyError),
    /// The period's usage of a meter is in rating quarantine (its usage or its price left the decimal
    /// range, README "Overflow is data, not a crash"): it is charged only up to a window, so it is
    /// not invoiced until the usage is corrected.
    #[error(
        "usage of meter {meter} in {} is quarantined from window {} on (its usage or its price left          the decimal range): correct the usage (void the offending events, run a re-rating job), then          issue the invoice",
        month(*.period_start),
        instant(*.from_window)
    )]
    Quarantined {
        meter: String,
        /// Seconds since the epoch.
        period_start: i64,
        /// Seconds since the epoch.
        from_window: i64,
    },
}

/// An amount rounded once to the currency's minor unit ([`round_to_minor_unit`]) and written with
/// exactly that many decimals (`0.5` USD is `0.50`), so every amount of an invoice reads alike.
pub fn billed_amount(amount: Decimal, currency: &str) -> Decimal {
    let mut rounded = round_to_minor_unit(amount, currency);
    rounded.rescale(minor_unit_digits(currency));
    rounded
}

/// `2024-01-15T10:00:00Z` for `secs` seconds since the epoch.
fn instant(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0).map_or_else(
        || secs.to_string(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

/// `2024-01` for a period starting at `start` (seconds).
fn month(start: i64) -> String {
    chrono::DateTime::from_timestamp(start, 0)
        .map_or_else(|| start.to_string(), |t| t.format("%Y-%m").to_string())
}

impl PeriodUsage {
    /// The top-up the book's minimum adds, unrounded: `minimum − amount` when the usage is below it.
    fn shortfall(&self) -> Option<Decimal> {
        self.minimum.filter(|m| self.amount < *m)
    }

    /// What this line bills in `currency`, rounded once: `round(max(amount, minimum))`.
    pub fn billed(&self, currency: &str) -> Decimal {
        billed_amount(self.shortfall().unwrap_or(self.amount), currency)
    }

    /// The invoice lines for this usage: the usage line, and the top-up line when the usage is below
    /// the book's minimum. The top-up is the rounded minimum less the rounded usage, so the two lines add
    /// up to exactly [`billed`](Self::billed) (rounding each separately could overshoot the minimum by a
    /// minor unit).
    pub fn lines(&self, currency: &str) -> Result<Vec<InvoiceLine>, MoneyError> {
        let usage = billed_amount(self.amount, currency);
        let description = if self.dimensions.is_empty() {
            format!("{} usage", self.meter)
        } else {
            format!("{} — {}", self.meter, self.dimensions.describe())
        };
        let mut lines = vec![InvoiceLine {
            meter: self.meter.clone(),
            dimensions: self.dimensions.clone(),
            kind: LineKind::Usage,
            description,
            quantity: self.quantity,
            unit_price_summary: self.unit_price_summary.clone(),
            amount: usage,
            price_book_id: self.price_book_id.clone(),
        }];
        if let Some(minimum) = self.shortfall() {
            lines.push(InvoiceLine {
                meter: self.meter.clone(),
                dimensions: self.dimensions.clone(),
                kind: LineKind::Minimum,
                description: "Top-up to the monthly minimum".to_owned(),
                quantity: Decimal::ONE,
                unit_price_summary: format!("minimum per period: {minimum} {currency}"),
                amount: money::sub(billed_amount(minimum, currency), usage)?,
                price_book_id: self.price_book_id.clone(),
            });
        }
        Ok(lines)
    }

    fn check_currency(&self, currency: &str, period_start: i64) -> Result<(), InvoiceError> {
        if self.currency == currency {
            return Ok(());
        }
        Err(InvoiceError::CurrencyMismatch {
            meter: self.meter.clone(),
            price_book_id: self.price_book_id.clone(),
            period_start,
            line_currency: self.currency.clone(),
            customer_currency: currency.to_owned(),
        })
    }
}

/// An invoice's lines and subtotal for one period: what issuing it now would bill, before adjustments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draft {
    pub currency: String,
    /// Ordered by meter and book; a top-up follows its usage line.
    pub line_items: Vec<InvoiceLine>,
    /// Σ rounded line amounts.
    pub subtotal: Decimal,
}

/// The draft of a period from its usage lines, in the customer's `currency`.
pub fn draft(
    usage: &[PeriodUsage],
    currency: &str,
    period_start: i64,
) -> Result<Draft, InvoiceError> {
    let mut sorted: Vec<&PeriodUsage> = usage.iter().collect();
    sorted.sort_by(|a, b| {
        (&a.meter, &a.dimensions, &a.price_book_id).cmp(&(
            &b.meter,
            &b.dimensions,
            &b.price_book_id,
        ))
    });
    let mut line_items = Vec::with_capacity(sorted.len());
    let mut subtotal = billed_amount(Decimal::ZERO, currency);
    for u in sorted {
        u.check_currency(currency, period_start)?;
        for line in u.lines(currency)? {
            subtotal = money::add(subtotal, line.amount)?;
            line_items.push(line);
        }
    }
    Ok(Draft {
        currency: currency.to_owned(),
        line_items,
        subtotal,
    })
}

/// What adjustments correct: one (period, meter, price book) of a customer, its usage and top-up together.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LineKey {
    /// Seconds since the epoch.
    pub period_start: i64,
    pub meter: String,
    pub dimensions: Dimensions,
    pub price_book_id: String,
}

/// One needed correction: the line should bill `target` and the issued invoices bill `billed`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Correction {
    pub key: LineKey,
    pub billed: Decimal,
    pub target: Decimal,
    /// `target − billed`, never zero.
    pub amount: Decimal,
}

/// The corrections that make the issued invoices bill `targets` (SPEC §6): for every key in either map,
/// `target − billed` (a missing entry is zero), non-zero ones only, in key order.
pub fn corrections(
    targets: &BTreeMap<LineKey, Decimal>,
    billed: &BTreeMap<LineKey, Decimal>,
) -> Result<Vec<Correction>, MoneyError> {
    let keys: BTreeSet<&LineKey> = targets.keys().chain(billed.keys()).collect();
    let mut out = Vec::new();
    for key in keys {
        let target = targets.get(key).copied().unwrap_or_default();
        let was = billed.get(key).copied().unwrap_or_default();
        let amount = money::sub(target, was)?;
        if !amount.is_zero() {
            out.push(Correction {
                key: key.clone(),
                billed: was,
                target,
                amount,
            });
        }
    }
    Ok(out)
}

/// The targets of a period's usage lines in `currency`: `billed` per (meter, book).
pub fn targets(
    usage: &[PeriodUsage],
    currency: &str,
    period_start: i64,
) -> Result<BTreeMap<LineKey, Decimal>, InvoiceError> {
    let mut out = BTreeMap::new();
    for u in usage {
        u.check_currency(currency, period_start)?;
        out.insert(
            LineKey {
                period_start,
                meter: u.meter.clone(),
                dimensions: u.dimensions.clone(),
                price_book_id: u.price_book_id.clone(),
            },
            u.billed(currency),
        );
    }
    Ok(out)
}

/// How a book prices, for people: `per unit: 0.01`, `graduated: 0.01 up to 1000, then 0.005`,
/// `volume: 0.01 up to 1000, 0.005 above`, `package: 9.90 per 100`. Flat fees follow their tier.
pub fn price_summary(model: &PriceModel) -> String {
    let tier_text = |t: &crate::price::Tier| {
        let fee = if t.flat_fee.is_zero() {
            String::new()
        } else {
            format!(" + {} flat", t.flat_fee.normalize())
        };
        match t.up_to {
            Some(up) => format!("{}{fee} up to {}", t.unit_price, up.normalize()),
            None => format!("{}{fee}", t.unit_price),
        }
    };
    match model {
        PriceModel::PerUnit { unit_price } => format!("per unit: {unit_price}"),
        PriceModel::Graduated { tiers } => format!(
            "graduated: {}",
            tiers
                .iter()
                .map(tier_text)
                .collect::<Vec<_>>()
                .join(", then ")
        ),
        PriceModel::Volume { tiers } => {
            let text: Vec<String> = tiers
                .iter()
                .map(|t| match t.up_to {
                    Some(_) => tier_text(t),
                    None => format!("{} above", tier_text(t)),
                })
                .collect();
            format!("volume: {}", text.join(", "))
        }
        PriceModel::Package {
            package_size,
            package_price,
        } => format!("package: {package_price} per {}", package_size.normalize()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn usage(amount: &str, minimum: Option<&str>) -> PeriodUsage {
        PeriodUsage {
            dimensions: Default::default(),
            meter: "api_call".into(),
            price_book_id: "pb_1".into(),
            currency: "USD".into(),
            quantity: d("10"),
            amount: d(amount),
            minimum: minimum.map(d),
            unit_price_summary: "per unit: 0.3335".into(),
        }
    }

    #[test]
    fn a_line_is_rounded_once_half_away_from_zero() {
        let lines = usage("3.335", None).lines("USD").unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].amount, d("3.34"));
        assert_eq!(usage("3.335", None).billed("USD"), d("3.34"));
    }

    #[test]
    fn usage_and_top_up_add_up_to_exactly_the_minimum() {
        // round(1.005) + round(3.995) would be 1.01 + 4.00 = 5.01: one cent over the minimum.
        let u = usage("1.005", Some("5"));
        let lines = u.lines("USD").unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            (lines[0].kind, lines[0].amount),
            (LineKind::Usage, d("1.01"))
        );
        assert_eq!(
            (lines[1].kind, lines[1].amount),
            (LineKind::Minimum, d("3.99"))
        );
        assert_eq!(lines[0].amount + lines[1].amount, u.billed("USD"));
        assert_eq!(u.billed("USD"), d("5.00"));
    }

    #[test]
    fn usage_at_or_above_the_minimum_has_no_top_up() {
        assert_eq!(usage("5", Some("5")).lines("USD").unwrap().len(), 1);
        assert_eq!(usage("7.5", Some("5")).lines("USD").unwrap().len(), 1);
        assert_eq!(usage("7.5", Some("5")).billed("USD").to_string(), "7.50");
        assert_eq!(billed_amount(d("2"), "JPY").to_string(), "2");
        assert_eq!(billed_amount(d("0.5"), "KWD").to_string(), "0.500");
    }

    #[test]
    fn a_draft_refuses_lines_in_another_currency() {
        let mut eur = usage("1", None);
        eur.currency = "EUR".into();
        let err = draft(&[usage("2", None), eur], "USD", 0).unwrap_err();
        assert!(matches!(err, InvoiceError::CurrencyMismatch { .. }));
        assert!(err.to_string().contains("billed in USD"), "{err}");
        assert!(
            err.to_string()
                .contains("in 1970-01 is priced by book pb_1 in EUR"),
            "{err}"
        );
    }

    #[test]
    fn a_draft_orders_lines_and_sums_them() {
        let mut b = usage("0.004", Some("2"));
        b.meter = "a_first".into();
        let draft = draft(&[usage("3.335", None), b], "USD", 0).unwrap();
        let meters: Vec<(&str, LineKind)> = draft
            .line_items
            .iter()
            .map(|l| (l.meter.as_str(), l.kind))
            .collect();
        assert_eq!(
            meters,
            [
                ("a_first", LineKind::Usage),
                ("a_first", LineKind::Minimum),
                ("api_call", LineKind::Usage)
            ]
        );
        assert_eq!(draft.subtotal, d("5.34"));
    }

    #[test]
    fn corrections_bring_what_was_billed_to_the_target_for_every_key() {
        let key = |p: i64, b: &str| LineKey {
            dimensions: Default::default(),
            period_start: p,
            meter: "m".into(),
            price_book_id: b.into(),
        };
        let targets = BTreeMap::from([
            (key(1, "a"), d("10.00")),
            (key(1, "b"), d("3.00")),
            (key(2, "a"), d("4.00")),
        ]);
        let billed = BTreeMap::from([
            (key(1, "a"), d("12.50")),
            (key(2, "a"), d("4.00")),
            (key(3, "a"), d("1.00")),
        ]);
        let got = corrections(&targets, &billed).unwrap();
        let amounts: Vec<(LineKey, Decimal)> =
            got.iter().map(|c| (c.key.clone(), c.amount)).collect();
        assert_eq!(
            amounts,
            [
                (key(1, "a"), d("-2.50")),
                (key(1, "b"), d("3.00")),
                (key(3, "a"), d("-1.00"))
            ]
        );
        // After applying them, every key bills its target.
        let mut after = billed.clone();
        for c in &got {
            *after.entry(c.key.clone()).or_default() += c.amount;
        }
        after.retain(|_, v| !v.is_zero());
        assert_eq!(after, targets);
    }

    #[test]
    fn summaries_read_like_a_price_list() {
        use crate::price::Tier;
        let tier = |up: Option<&str>, p: &str, f: &str| Tier {
            up_to: up.map(d),
            unit_price: d(p),
            flat_fee: d(f),
        };
        assert_eq!(
            price_summary(&PriceModel::PerUnit {
                unit_price: d("0.01")
            }),
            "per unit: 0.01"
        );
        assert_eq!(
            price_summary(&PriceModel::Graduated {
                tiers: vec![tier(Some("1000"), "0.01", "0"), tier(None, "0.005", "5")]
            }),
            "graduated: 0.01 up to 1000, then 0.005 + 5 flat"
        );
        assert_eq!(
            price_summary(&PriceModel::Volume {
                tiers: vec![tier(Some("1000"), "0.01", "0"), tier(None, "0.005", "0")]
            }),
            "volume: 0.01 up to 1000, 0.005 above"
        );
        assert_eq!(
            price_summary(&PriceModel::Package {
                package_size: d("100"),
                package_price: d("9.90")
            }),
            "package: 9.90 per 100"
        );
    }
}
