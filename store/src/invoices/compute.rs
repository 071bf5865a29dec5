//! What an invoice bills, computed in the issuing transaction: the period's usage loaded per (meter,
//! book) with the books' minimums and prices, the lines rounded once and topped up to the minimums, and
//! the corrections of earlier invoices (adjustments) from what was billed before ([`Ledger`]).

use super::*;

/// What the customers' issued invoices bill per line, and which invoice each adjustment corrected last.
#[derive(Default)]
pub(super) struct Ledger {
    pub(super) billed: HashMap<String, BTreeMap<LineKey, Decimal>>,
    /// The original invoice of the latest adjustment of each line.
    pub(super) corrected: HashMap<(String, LineKey), String>,
}

impl Ledger {
    pub(super) async fn load(
        tx: &mut PgConnection,
        customer_ids: &[String],
    ) -> Result<Ledger, sqlx::Error> {
        let mut ledger = Ledger::default();
        if customer_ids.is_empty() {
            return Ok(ledger);
        }
        let key = |start: DateTime<Utc>,
                   meter: String,
                   Json(dimensions): Json<Dimensions>,
                   price_book_id: String| LineKey {
            period_start: start.timestamp(),
            meter,
            dimensions,
            price_book_id,
        };
        // A line issued before dimensions existed has none: `{}`.
        let lines = sqlx::query!(
            r#"SELECT i.customer_id, i.billing_period_start, l.meter AS "meter!",
                      COALESCE(l.dimensions, '{}') AS "dimensions!: Json<Dimensions>",
                      l.price_book_id AS "price_book_id!", l.amount AS "amount!"
               FROM invoices i,
                    jsonb_to_recordset(i.line_items)
                      AS l(meter text, dimensions jsonb, price_book_id text, amount numeric)
               WHERE i.customer_id = ANY($1) AND i.status = 'issued'"#,
            customer_ids,
        )
        .fetch_all(&mut *tx)
        .await?;
        for row in lines {
            let key = key(
                row.billing_period_start,
                row.meter,
                row.dimensions,
                row.price_book_id,
            );
            ledger
                .add(row.customer_id, key, row.amount)
                .map_err(overflow)?;
        }
        let adjustments = sqlx::query!(
            r#"SELECT i.customer_id, a.period_start, a.meter,
                    a.dimensions AS "dimensions: Json<Dimensions>", a.price_book_id, a.amount,
                    a.original_invoice_id
             FROM invoices i JOIN invoice_adjustments a ON a.invoice_id = i.invoice_id
             WHERE i.customer_id = ANY($1) AND i.status = 'issued'
             ORDER BY i.number, a.position"#,
            customer_ids,
        )
        .fetch_all(&mut *tx)
        .await?;
        for row in adjustments {
            let key = key(
                row.period_start,
                row.meter,
                row.dimensions,
                row.price_book_id,
            );
            ledger.corrected.insert(
                (row.customer_id.clone(), key.clone()),
                row.original_invoice_id,
            );
            ledger
                .add(row.customer_id, key, row.amount)
                .map_err(overflow)?;
        }
        Ok(ledger)
    }

    pub(super) fn add(
        &mut self,
        customer: String,
        key: LineKey,
        amount: Decimal,
    ) -> Result<(), MoneyError> {
        let sum = self
            .billed
            .entry(customer)
            .or_default()
            .entry(key)
            .or_default();
        *sum = money::add(*sum, amount)?;
        Ok(())
    }
}

pub(super) fn overflow(e: MoneyError) -> sqlx::Error {
    sqlx::Error::Decode(Box::new(e))
}

/// The current usage of some (customer, period)s with their books' minimums and prices.
pub(super) async fn load_usage(
    tx: &mut PgConnection,
    pairs: &[(String, DateTime<Utc>)],
) -> Result<UsageByPeriod, sqlx::Error> {
    let rows = sqlx::query_as!(
        UsageRow,
        r#"SELECT u.customer_id, u.period_start, u.meter,
                u.dimensions AS "dimensions: Json<Dimensions>", u.price_book_id, u.currency, u.quantity,
                u.amount, b.minimum_per_period AS "minimum_per_period?", b.model AS "model?",
                b.entries AS "entries?"
         FROM upcoming_lines u LEFT JOIN price_books b ON b.price_book_id = u.price_book_id
         WHERE (u.customer_id, u.period_start) IN (SELECT * FROM UNNEST($1::text[], $2::timestamptz[]))"#,
        &pairs.iter().map(|(c, _)| c.clone()).collect::<Vec<_>>(),
        &pairs.iter().map(|(_, p)| *p).collect::<Vec<_>>(),
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut out = UsageByPeriod::new();
    for row in rows {
        out.entry((row.customer_id.clone(), row.period_start.timestamp()))
            .or_default()
            .push(row.into());
    }
    Ok(out)
}

/// An `upcoming_lines` row with its book's minimum and prices (the book is outer-joined: both optional).
pub(super) struct UsageRow {
    pub(super) customer_id: String,
    pub(super) period_start: DateTime<Utc>,
    pub(super) meter: String,
    pub(super) dimensions: Json<Dimensions>,
    pub(super) price_book_id: String,
    pub(super) currency: String,
    pub(super) quantity: Decimal,
    pub(super) amount: Decimal,
    pub(super) minimum_per_period: Option<Decimal>,
    pub(super) model: Option<serde_json::Value>,
    /// A rate card's entries; the line's prices are those of the entry that matches its values.
    pub(super) entries: Option<serde_json::Value>,
}

/// The row's `PeriodUsage`; a book that is gone or whose prices do not read is summarised by its id.
impl From<UsageRow> for PeriodUsage {
    fn from(row: UsageRow) -> Self {
        let card = row
            .entries
            .and_then(|v| serde_json::from_value::<Vec<RateEntry>>(v).ok());
        let model = match card {
            Some(entries) => entry_for(&entries, &row.dimensions.0).map(|e| e.model.clone()),
            None => row
                .model
                .and_then(|v| serde_json::from_value::<PriceModel>(v).ok()),
        };
        let summary = model.as_ref().map_or_else(
            || format!("price book {}", row.price_book_id),
            price_summary,
        );
        PeriodUsage {
            meter: row.meter,
            dimensions: row.dimensions.0,
            price_book_id: row.price_book_id,
            currency: row.currency,
            quantity: row.quantity,
            amount: row.amount,
            minimum: row.minimum_per_period,
            unit_price_summary: summary,
        }
    }
}

/// A customer's invoice for period `p` before it has a number.
pub(super) struct Computed {
    pub(super) line_items: Vec<InvoiceLine>,
    pub(super) adjustments: Vec<Adjustment>,
    pub(super) subtotal: Decimal,
    pub(super) total: Decimal,
}

pub(super) fn compute(
    customer: &Customer,
    p: i64,
    issued: &HashMap<(String, i64), IssuedPeriod>,
    ledger: &Ledger,
    usage: &UsageByPeriod,
) -> Result<Computed, InvoiceError> {
    let id = &customer.customer_id;
    let currency = customer.currency.as_str();
    let none = Vec::new();
    let usage_of = |start: i64| usage.get(&(id.clone(), start)).unwrap_or(&none);
    let draft = draft(usage_of(p), currency, p)?;
    let this_period = targets(usage_of(p), currency, p)?;

    // What every line of the issued periods, and of this one, should bill now …
    let mut target = this_period.clone();
    let mut covered: Vec<(i64, &IssuedPeriod)> = issued
        .iter()
        .filter(|((c, _), _)| c == id)
        .map(|((_, start), inv)| (*start, inv))
        .collect();
    covered.sort_by_key(|(start, _)| *start);
    for (start, _) in &covered {
        target.extend(targets(usage_of(*start), currency, *start)?);
    }
    // … and what they bill: the issued invoices' lines and adjustments, plus this invoice's lines.
    let mut billed = ledger.billed.get(id).cloned().unwrap_or_default();
    for (key, amount) in this_period {
        let sum = billed.entry(key).or_default();
        *sum = money::add(*sum, amount)?;
    }
    let mut adjustments = Vec::new();
    let mut total = draft.subtotal;
    for c in corrections(&target, &billed)? {
        let of_issued = covered
            .iter()
            .find(|(start, _)| *start == c.key.period_start && *start != p)
            .map(|(_, inv)| *inv);
        let earlier = ledger.corrected.get(&(id.clone(), c.key.clone()));
        let (original, reason) = match of_issued {
            Some(inv) => (
                inv.invoice_id.clone(),
                format!(
                    "Usage or prices changed after invoice {}: now {} {currency}, billed {} {currency}",
                    inv.number, c.target, c.billed
                ),
            ),
            None if c.key.period_start == p => (
                earlier.cloned().unwrap_or_default(),
                "Reverses the adjustments of this period's voided invoice: this invoice bills the \
                 period in full"
                    .to_owned(),
            ),
            None => (
                earlier.cloned().unwrap_or_default(),
                "The period's invoice was voided: reverses the adjustments made to it".to_owned(),
            ),
        };
        total = money::add(total, c.amount)?;
        adjustments.push(Adjustment {
            original_invoice_id: original,
            period_start: c.key.period_start,
            meter: c.key.meter,
            dimensions: c.key.dimensions,
            price_book_id: c.key.price_book_id,
            amount: c.amount,
            reason,
        });
    }
    Ok(Computed {
        line_items: draft.line_items,
        adjustments,
        subtotal: draft.subtotal,
        total,
    })
}
