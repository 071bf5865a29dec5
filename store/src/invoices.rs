//! Issuing and voiding invoices in Postgres (SPEC §6). The API (`POST /api/v1/invoices`), invoice runs
//! and `meterflow invoice-run` all issue through [`issue_batch`]; one customer is a batch of one.
//!
//! ```text
//!  BEGIN (read committed)
//!    customers … FOR UPDATE (id order)   one issuer per customer at a time; voids and currency edits too
//!    issued invoices of the customers    one for the period already? ─► skipped (INVOICE_ALREADY_EXISTS)
//!    their issued lines + adjustments    what each (period, meter, book) line bills so far
//!    upcoming_lines ⋈ price_books        one statement: the period's usage and every issued period's, now
//!      ─► model::invoice: lines rounded once, minimum top-ups, corrections of issued periods
//!    UPDATE invoice_numbers … + k        the gapless numbers, taken last: the row lock is held briefly
//!    INSERT invoices (lines: jsonb), adjustments (UNNEST)   23505 on invoices_one_issued_per_period
//!                                           is the database's own guard ─► INVOICE_ALREADY_EXISTS
//!  COMMIT                                 numbers, invoices and (for runs) item states together
//! ```
//! Contract: a customer has at most one issued invoice per period (a unique index); numbers are gapless
//! (a rolled-back issue takes its number with it); an issued invoice never changes; a void only flips its
//! status. At every issue, for every (period, meter, book) of the customer's issued periods, the issued
//! lines and adjustments add up to `round(current amount including the top-up)`, so the customer's issued
//! totals add up to the current price of every period they cover ([`meterflow_model::invoice`]).
//!
//! Adjustments cover every earlier issued invoice of the customer (whatever its period), every
//! (meter, book) of its period that has usage now — also a book that did not price it when it was issued —
//! and the adjustments of voided periods (reversed, since their period is no longer billed). A
//! re-issued period bills in full, so the adjustments made to its voided invoice are reversed too.
//!
//! Reads take one snapshot where it matters: a period's usage and every issued period's come from one
//! statement, so lines and adjustments of an invoice agree with each other even while the pipeline
//! commits; the customers' own invoices cannot change meanwhile (their rows are locked).

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use compute::{compute, load_usage, Ledger, UsageRow};
use meterflow_model::invoice::{corrections, draft, price_summary, targets, LineKey};
use meterflow_model::money::{self, MoneyError};
use meterflow_model::{
    entry_for, period_of, Adjustment, Customer, Dimensions, Invoice, InvoiceError, InvoiceLine,
    InvoiceStatus, PeriodUsage, PriceModel, RateEntry,
};
use rust_decimal::Decimal;
use sqlx::types::Json;
use sqlx::{Connection, PgConnection};

mod compute;
mod stored;
pub use stored::{get_invoice, issued_invoice_id, list_invoices, void_invoice, InvoiceFilter};

/// The partial unique index that allows one issued invoice per customer and period.
pub const ONE_ISSUED_PER_PERIOD: &str = "invoices_one_issued_per_period";

/// A billing period: a calendar month, UTC, half-open `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Period {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// Why bounds are not a billing period.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeriodError {
    #[error("must be the first instant of a calendar month (UTC), such as 2024-01-01T00:00:00Z")]
    Start,
    #[error(
        "must be the first instant of the next month, {0} (or the last millisecond before it, \
         …T23:59:59.999Z)"
    )]
    End(String),
    #[error("must be a month written YYYY-MM, such as 2024-01")]
    Month,
}

impl Period {
    /// The period with these bounds (the end exclusive) if they are a calendar month.
    pub fn from_bounds(start: DateTime<Utc>, end: DateTime<Utc>) -> Result<Period, PeriodError> {
        let period = Period::containing(start);
        if period.start != start {
            return Err(PeriodError::Start);
        }
        if end != period.end {
            return Err(PeriodError::End(rfc3339(period.end)));
        }
        Ok(period)
    }

    /// `2024-01` → January 2024.
    pub fn parse_month(text: &str) -> Result<Period, PeriodError> {
        let (year, month) = text.split_once('-').ok_or(PeriodError::Month)?;
        let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(year, 4) || !digits(month, 2) {
            return Err(PeriodError::Month);
        }
        let date = NaiveDate::from_ymd_opt(
            year.parse().map_err(|_| PeriodError::Month)?,
            month.parse().map_err(|_| PeriodError::Month)?,
            1,
        )
        .ok_or(PeriodError::Month)?;
        Ok(Period::containing(
            date.and_hms_opt(0, 0, 0)
                .ok_or(PeriodError::Month)?
                .and_utc(),
        ))
    }

    /// The calendar month holding `t`.
    pub fn containing(t: DateTime<Utc>) -> Period {
        let (start, end) = period_of(t.timestamp());
        let at = |s| DateTime::from_timestamp(s, 0).unwrap_or_default();
        Period {
            start: at(start),
            end: at(end),
        }
    }

    /// `2024-01`.
    pub fn month(&self) -> String {
        format!("{:04}-{:02}", self.start.year(), self.start.month())
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The instant before which periods have ended: the later of `now` (the caller's clock) and the
/// pipeline's committed watermark for `topic` (SPEC §6).
pub async fn ended_by(
    conn: &mut PgConnection,
    topic: &str,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, sqlx::Error> {
    let watermark = sqlx::query_scalar!(
        "SELECT committed_watermark FROM pipeline_leases WHERE topic = $1",
        topic,
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(watermark.flatten().map_or(now, |w| w.max(now)))
}

/// An invoice as stored, with its void details.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredInvoice {
    pub invoice: Invoice,
    pub voided_at: Option<DateTime<Utc>>,
    pub void_reason: Option<String>,
}

/// Why one invoice could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(
        "customer {0} is not registered: register it (POST /api/v1/customers) to invoice its usage"
    )]
    UnknownCustomer(String),
    #[error("customer {customer_id} already has an issued invoice for this period{}; void it to issue the period again",
        .invoice_id.as_deref().map(|id| format!(" ({id})")).unwrap_or_default())]
    AlreadyExists {
        customer_id: String,
        invoice_id: Option<String>,
    },
    #[error(
        "the period ends at {}; it has not ended yet by the clock or the pipeline's watermark ({})",
        rfc3339(*.end), rfc3339(*.ended_by)
    )]
    PeriodNotEnded {
        end: DateTime<Utc>,
        ended_by: DateTime<Utc>,
    },
    #[error(transparent)]
    Invoice(#[from] InvoiceError),
    #[error("postgres refused the issue: {0}")]
    Database(#[from] sqlx::Error),
}

/// Issues `customer_id`'s invoice for `period` in one transaction of its own (see the module docs). The
/// period must have ended by `now` or by the committed watermark of `topic`.
pub async fn issue(
    conn: &mut PgConnection,
    customer_id: &str,
    period: Period,
    topic: &str,
    now: DateTime<Utc>,
) -> Result<Invoice, IssueError> {
    let mut tx = conn.begin().await?;
    let ended_by = ended_by(&mut tx, topic, now).await?;
    if period.end > ended_by {
        return Err(IssueError::PeriodNotEnded {
            end: period.end,
            ended_by,
        });
    }
    let ids = [customer_id.to_owned()];
    let mut outcome = match issue_batch(&mut tx, &ids, period, now).await {
        Ok(outcome) => outcome,
        Err(e) if violates(&e, ONE_ISSUED_PER_PERIOD) => {
            return Err(IssueError::AlreadyExists {
                customer_id: customer_id.to_owned(),
                invoice_id: None,
            })
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(invoice) = outcome.issued.pop() {
        match tx.commit().await {
            Ok(()) => return Ok(invoice),
            Err(e) if violates(&e, ONE_ISSUED_PER_PERIOD) => {}
            Err(e) => return Err(e.into()),
        }
        return Err(IssueError::AlreadyExists {
            customer_id: customer_id.to_owned(),
            invoice_id: None,
        });
    }
    if let Some((customer_id, invoice_id)) = outcome.skipped.pop() {
        return Err(IssueError::AlreadyExists {
            customer_id,
            invoice_id: Some(invoice_id),
        });
    }
    if let Some((_, e)) = outcome.failed.pop() {
        return Err(e.into());
    }
    Err(IssueError::UnknownCustomer(customer_id.to_owned()))
}

/// Is `e` a violation of the constraint (or unique index) `name`?
pub fn violates(e: &sqlx::Error, name: &str) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.constraint() == Some(name))
}

/// What a batch did, per customer.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    pub issued: Vec<Invoice>,
    /// Customers that already had an issued invoice for the period, and its id.
    pub skipped: Vec<(String, String)>,
    /// Ids that are not registered customers.
    pub unknown: Vec<String>,
    /// Customers whose invoice cannot be computed (a line in another currency, an overflow).
    pub failed: Vec<(String, InvoiceError)>,
}

/// A (customer, period) of an issued invoice.
struct IssuedPeriod {
    invoice_id: String,
    number: i64,
}

/// The usage of (customer, period start seconds).
type UsageByPeriod = HashMap<(String, i64), Vec<PeriodUsage>>;

/// Issues the invoices of `customer_ids` for `period` in the caller's transaction (see the module docs);
/// nothing is committed here. The caller has checked that the period has ended.
pub async fn issue_batch(
    tx: &mut PgConnection,
    customer_ids: &[String],
    period: Period,
    issued_at: DateTime<Utc>,
) -> Result<BatchOutcome, sqlx::Error> {
    let mut outcome = BatchOutcome::default();
    let customers = lock_customers(tx, customer_ids).await?;
    let known: HashSet<&str> = customers.iter().map(|c| c.customer_id.as_str()).collect();
    outcome.unknown = customer_ids
        .iter()
        .filter(|id| !known.contains(id.as_str()))
        .cloned()
        .collect();
    let p = period.start.timestamp();

    // Every issued invoice of these customers, by (customer, period).
    let mut issued: HashMap<(String, i64), IssuedPeriod> = HashMap::new();
    for row in sqlx::query!(
        "SELECT customer_id, billing_period_start, invoice_id, number FROM invoices
         WHERE customer_id = ANY($1) AND status = 'issued'",
        customer_ids,
    )
    .fetch_all(&mut *tx)
    .await?
    {
        issued.insert(
            (row.customer_id, row.billing_period_start.timestamp()),
            IssuedPeriod {
                invoice_id: row.invoice_id,
                number: row.number,
            },
        );
    }
    let mut todo: Vec<&Customer> = Vec::with_capacity(customers.len());
    for c in &customers {
        match issued.get(&(c.customer_id.clone(), p)) {
            Some(existing) => outcome
                .skipped
                .push((c.customer_id.clone(), existing.invoice_id.clone())),
            None => todo.push(c),
        }
    }
    // A period in rating quarantine is charged only up to a window: not invoiced (findings 3, 17).
    let todo_ids: Vec<String> = todo.iter().map(|c| c.customer_id.clone()).collect();
    let quarantined = sqlx::query!(
        r#"SELECT DISTINCT ON (customer_id) customer_id, meter,
                  extract(epoch FROM from_window)::bigint AS "from_window!"
           FROM rating_quarantine WHERE customer_id = ANY($1) AND period_start = $2
           ORDER BY customer_id, meter"#,
        &todo_ids,
        period.start,
    )
    .fetch_all(&mut *tx)
    .await?;
    for row in quarantined {
        todo.retain(|c| c.customer_id != row.customer_id);
        outcome.failed.push((
            row.customer_id,
            InvoiceError::Quarantined {
                meter: row.meter,
                period_start: p,
                from_window: row.from_window,
            },
        ));
    }
    if todo.is_empty() {
        return Ok(outcome);
    }
    // Customers with earlier invoices: only theirs can need adjustments.
    let invoiced: HashSet<&str> = issued.keys().map(|(id, _)| id.as_str()).collect();
    let with_history: Vec<String> = todo
        .iter()
        .filter(|c| invoiced.contains(c.customer_id.as_str()))
        .map(|c| c.customer_id.clone())
        .collect();
    let ledger = Ledger::load(tx, &with_history).await?;

    // The usage of the period and of every issued period of these customers, in one statement.
    let mut pairs: Vec<(String, DateTime<Utc>)> = todo
        .iter()
        .map(|c| (c.customer_id.clone(), period.start))
        .collect();
    let history: HashSet<&String> = with_history.iter().collect();
    pairs.extend(
        issued
            .keys()
            .filter(|(id, _)| history.contains(id))
            .map(|(id, start)| {
                (
                    id.clone(),
                    DateTime::from_timestamp(*start, 0).unwrap_or_default(),
                )
            }),
    );
    let usage = load_usage(tx, &pairs).await?;

    let mut drafts = Vec::with_capacity(todo.len());
    for customer in todo {
        match compute(customer, p, &issued, &ledger, &usage) {
            Ok(computed) => drafts.push((customer, computed)),
            Err(e) => outcome.failed.push((customer.customer_id.clone(), e)),
        }
    }
    if drafts.is_empty() {
        return Ok(outcome);
    }

    let last = sqlx::query_scalar!(
        "UPDATE invoice_numbers SET last_number = last_number + $1 WHERE singleton
         RETURNING last_number",
        drafts.len() as i64,
    )
    .fetch_one(&mut *tx)
    .await?;
    let first = last - drafts.len() as i64 + 1;
    let invoices: Vec<Invoice> = drafts
        .into_iter()
        .zip(first..)
        .map(|((customer, computed), number)| Invoice {
            invoice_id: new_invoice_id(),
            number,
            customer_id: customer.customer_id.clone(),
            billing_period_start: p,
            billing_period_end: period.end.timestamp(),
            status: InvoiceStatus::Issued,
            currency: customer.currency.clone(),
            line_items: computed.line_items,
            adjustments: computed.adjustments,
            subtotal: computed.subtotal,
            total: computed.total,
            issued_at: issued_at.timestamp_micros(),
        })
        .collect();
    insert(tx, &invoices, period, issued_at).await?;
    outcome.issued = invoices;
    Ok(outcome)
}

/// A `customers` row as the issuers lock it: the customer, without its timestamps.
struct CustomerRow {
    customer_id: String,
    name: String,
    email: Option<String>,
    address: Option<String>,
    currency: String,
}

impl From<CustomerRow> for Customer {
    fn from(row: CustomerRow) -> Self {
        Customer {
            customer_id: row.customer_id,
            name: row.name,
            email: row.email,
            address: row.address,
            currency: row.currency,
        }
    }
}

async fn lock_customers(
    tx: &mut PgConnection,
    customer_ids: &[String],
) -> Result<Vec<Customer>, sqlx::Error> {
    let rows = sqlx::query_as!(
        CustomerRow,
        "SELECT customer_id, name, email, address, currency FROM customers
         WHERE customer_id = ANY($1) ORDER BY customer_id FOR UPDATE",
        customer_ids,
    )
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.into_iter().map(Customer::from).collect())
}

/// `inv_` and 64 random bits in hex.
fn new_invoice_id() -> String {
    format!("inv_{:016x}", rand::random::<u64>())
}

async fn insert(
    tx: &mut PgConnection,
    invoices: &[Invoice],
    period: Period,
    issued_at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let lines = invoices
        .iter()
        .map(|i| serde_json::to_string(&i.line_items))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query!(
        "INSERT INTO invoices (invoice_id, number, customer_id, billing_period_start,
                               billing_period_end, status, currency, line_items, subtotal, total,
                               issued_at)
         SELECT i, n, c, $4, $5, 'issued', cur, l::jsonb, s, t, $6
         FROM UNNEST($1::text[], $2::bigint[], $3::text[], $7::text[], $8::text[], $9::numeric[],
                     $10::numeric[]) AS u(i, n, c, cur, l, s, t)",
        &invoices
            .iter()
            .map(|i| i.invoice_id.clone())
            .collect::<Vec<_>>(),
        &invoices.iter().map(|i| i.number).collect::<Vec<_>>(),
        &invoices
            .iter()
            .map(|i| i.customer_id.clone())
            .collect::<Vec<_>>(),
        period.start,
        period.end,
        issued_at,
        &invoices
            .iter()
            .map(|i| i.currency.clone())
            .collect::<Vec<_>>(),
        &lines,
        &invoices.iter().map(|i| i.subtotal).collect::<Vec<_>>(),
        &invoices.iter().map(|i| i.total).collect::<Vec<_>>(),
    )
    .execute(&mut *tx)
    .await?;

    let adjustments: Vec<(&str, i16, &Adjustment)> = invoices
        .iter()
        .flat_map(|i| {
            i.adjustments
                .iter()
                .zip(0i16..)
                .map(|(a, n)| (i.invoice_id.as_str(), n, a))
        })
        .collect();
    if !adjustments.is_empty() {
        sqlx::query!(
            "INSERT INTO invoice_adjustments (invoice_id, position, original_invoice_id, period_start,
                                              meter, price_book_id, amount, reason, dimensions)
             SELECT i, p, o, s, m, b, a, r, d::jsonb
             FROM UNNEST($1::text[], $2::smallint[], $3::text[], $4::timestamptz[],
                         $5::text[], $6::text[], $7::numeric[], $8::text[], $9::text[])
               AS u(i, p, o, s, m, b, a, r, d)",
            &adjustments.iter().map(|a| a.0.to_owned()).collect::<Vec<_>>(),
            &adjustments.iter().map(|a| a.1).collect::<Vec<_>>(),
            &adjustments
                .iter()
                .map(|a| a.2.original_invoice_id.clone())
                .collect::<Vec<_>>(),
            &adjustments
                .iter()
                .map(|a| DateTime::from_timestamp(a.2.period_start, 0).unwrap_or_default())
                .collect::<Vec<_>>(),
            &adjustments.iter().map(|a| a.2.meter.clone()).collect::<Vec<_>>(),
            &adjustments.iter().map(|a| a.2.price_book_id.clone()).collect::<Vec<_>>(),
            &adjustments.iter().map(|a| a.2.amount).collect::<Vec<_>>(),
            &adjustments.iter().map(|a| a.2.reason.clone()).collect::<Vec<_>>(),
            &adjustments
                .iter()
                .map(|a| a.2.dimensions.to_string())
                .collect::<Vec<_>>(),
        )
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// What issuing `customer_id`'s invoice for `period` now would bill, before adjustments and numbers: the
/// upcoming invoice (SPEC §6). Works for customers that are not registered, in `currency`.
pub async fn upcoming(
    conn: &mut PgConnection,
    customer_id: &str,
    currency: &str,
    period: Period,
) -> Result<meterflow_model::Draft, IssueError> {
    let rows = sqlx::query_as!(
        UsageRow,
        r#"SELECT u.customer_id, u.period_start, u.meter,
                u.dimensions AS "dimensions: Json<Dimensions>", u.price_book_id, u.currency, u.quantity,
                u.amount, b.minimum_per_period AS "minimum_per_period?", b.model AS "model?",
                b.entries AS "entries?"
         FROM upcoming_lines u LEFT JOIN price_books b ON b.price_book_id = u.price_book_id
         WHERE u.customer_id = $1 AND u.period_start = $2"#,
        customer_id,
        period.start,
    )
    .fetch_all(&mut *conn)
    .await?;
    let usage: Vec<PeriodUsage> = rows.into_iter().map(PeriodUsage::from).collect();
    Ok(draft(&usage, currency, period.start.timestamp())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn a_period_is_one_calendar_month_in_utc() {
        let feb =
            Period::from_bounds(at("2024-02-01T00:00:00Z"), at("2024-03-01T00:00:00Z")).unwrap();
        assert_eq!(feb.month(), "2024-02");
        assert_eq!(Period::parse_month("2024-02").unwrap(), feb);
        assert_eq!(Period::containing(at("2024-02-29T23:59:59Z")), feb);
        let dec = Period::parse_month("2023-12").unwrap();
        assert_eq!(dec.end, at("2024-01-01T00:00:00Z"));
        assert_eq!(
            Period::from_bounds(at("2024-02-01T01:00:00+01:00"), at("2024-03-01T00:00:00Z")),
            Ok(feb),
            "any offset, as long as the instant is the month's first"
        );
    }

    #[test]
    fn other_bounds_and_month_texts_are_refused() {
        assert_eq!(
            Period::from_bounds(at("2024-02-02T00:00:00Z"), at("2024-03-01T00:00:00Z")),
            Err(PeriodError::Start)
        );
        assert_eq!(
            Period::from_bounds(at("2024-02-01T00:00:00Z"), at("2024-04-01T00:00:00Z")),
            Err(PeriodError::End("2024-03-01T00:00:00Z".into()))
        );
        for bad in ["2024-13", "2024-1", "24-01", "2024/01", "2024-01-01", ""] {
            assert_eq!(Period::parse_month(bad), Err(PeriodError::Month), "{bad}");
        }
    }
}
