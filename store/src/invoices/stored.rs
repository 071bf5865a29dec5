//! Stored invoices: listed a page at a time, read one by one with their adjustments, and voided (the
//! status flips to `void`, which frees the period to be issued again; nothing is deleted).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use meterflow_model::{Adjustment, Invoice, InvoiceLine, InvoiceStatus};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{Connection, PgConnection, Row};

use super::StoredInvoice;

/// The id of the invoice issued to `customer_id` for the period starting at `period_start`, if any.
pub async fn issued_invoice_id(
    conn: &mut PgConnection,
    customer_id: &str,
    period_start: DateTime<Utc>,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT invoice_id FROM invoices
         WHERE customer_id = $1 AND billing_period_start = $2 AND status = 'issued'",
    )
    .bind(customer_id)
    .bind(period_start)
    .fetch_optional(&mut *conn)
    .await
}

const INVOICE_COLUMNS: &str = "invoice_id, number, customer_id, billing_period_start, \
    billing_period_end, status, currency, subtotal, total, issued_at, voided_at, void_reason, line_items";

/// Which invoices a list shows, and where a page starts.
#[derive(Clone, Debug, Default)]
pub struct InvoiceFilter<'a> {
    pub customer_id: Option<&'a str>,
    /// Invoices whose period starts in `[from, to)` (either end open when `None`).
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub status: Option<InvoiceStatus>,
    /// The number of the last invoice of the previous page.
    pub after_number: Option<i64>,
    pub limit: i64,
}

/// Invoices in number order (issue order), with their lines and adjustments.
pub async fn list_invoices(
    conn: &mut PgConnection,
    filter: &InvoiceFilter<'_>,
) -> Result<Vec<StoredInvoice>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {INVOICE_COLUMNS} FROM invoices
         WHERE ($1::text IS NULL OR customer_id = $1)
           AND ($2::timestamptz IS NULL OR billing_period_start >= $2)
           AND ($3::timestamptz IS NULL OR billing_period_start < $3)
           AND ($4::text IS NULL OR status = $4)
           AND ($5::bigint IS NULL OR number > $5)
         ORDER BY number LIMIT $6"
    ))
    .bind(filter.customer_id)
    .bind(filter.from)
    .bind(filter.to)
    .bind(filter.status.map(InvoiceStatus::as_str))
    .bind(filter.after_number)
    .bind(filter.limit)
    .fetch_all(&mut *conn)
    .await?;
    with_details(conn, rows).await
}

pub async fn get_invoice(
    conn: &mut PgConnection,
    invoice_id: &str,
) -> Result<Option<StoredInvoice>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {INVOICE_COLUMNS} FROM invoices WHERE invoice_id = $1"
    ))
    .bind(invoice_id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(with_details(conn, rows).await?.pop())
}

/// The invoices of `rows` with their adjustments (one statement for all of them).
async fn with_details(
    conn: &mut PgConnection,
    rows: Vec<PgRow>,
) -> Result<Vec<StoredInvoice>, sqlx::Error> {
    let mut invoices = rows
        .iter()
        .map(stored_invoice)
        .collect::<Result<Vec<_>, _>>()?;
    if invoices.is_empty() {
        return Ok(invoices);
    }
    let ids: Vec<String> = invoices
        .iter()
        .map(|i| i.invoice.invoice_id.clone())
        .collect();
    let at: HashMap<String, usize> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| (id.clone(), n))
        .collect();
    let adjustments = sqlx::query(
        "SELECT invoice_id, original_invoice_id, period_start, meter, price_book_id, amount, reason
         FROM invoice_adjustments WHERE invoice_id = ANY($1) ORDER BY invoice_id, position",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    for row in &adjustments {
        let start: DateTime<Utc> = row.try_get(2)?;
        let adjustment = Adjustment {
            original_invoice_id: row.try_get(1)?,
            period_start: start.timestamp(),
            meter: row.try_get(3)?,
            price_book_id: row.try_get(4)?,
            amount: row.try_get(5)?,
            reason: row.try_get(6)?,
        };
        let id: String = row.try_get(0)?;
        if let Some(issued) = at.get(&id).and_then(|i| invoices.get_mut(*i)) {
            issued.invoice.adjustments.push(adjustment);
        }
    }
    Ok(invoices)
}

fn stored_invoice(row: &PgRow) -> Result<StoredInvoice, sqlx::Error> {
    let start: DateTime<Utc> = row.try_get(3)?;
    let end: DateTime<Utc> = row.try_get(4)?;
    let status: String = row.try_get(5)?;
    let issued_at: DateTime<Utc> = row.try_get(9)?;
    let Json(line_items): Json<Vec<InvoiceLine>> = row.try_get(12)?;
    Ok(StoredInvoice {
        invoice: Invoice {
            invoice_id: row.try_get(0)?,
            number: row.try_get(1)?,
            customer_id: row.try_get(2)?,
            billing_period_start: start.timestamp(),
            billing_period_end: end.timestamp(),
            status: if status == "void" {
                InvoiceStatus::Void
            } else {
                InvoiceStatus::Issued
            },
            currency: row.try_get(6)?,
            line_items,
            adjustments: Vec::new(),
            subtotal: row.try_get(7)?,
            total: row.try_get(8)?,
            issued_at: issued_at.timestamp_micros(),
        },
        voided_at: row.try_get(10)?,
        void_reason: row.try_get(11)?,
    })
}

/// Voids an invoice: its status becomes `void`, which frees its period to be issued again (with a new
/// number); nothing is deleted. Voiding a void invoice changes nothing. `None`: no such invoice.
pub async fn void_invoice(
    conn: &mut PgConnection,
    invoice_id: &str,
    reason: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Option<StoredInvoice>, sqlx::Error> {
    let mut tx = conn.begin().await?;
    let customer_id: Option<String> =
        sqlx::query_scalar("SELECT customer_id FROM invoices WHERE invoice_id = $1")
            .bind(invoice_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(customer_id) = customer_id else {
        return Ok(None);
    };
    // The issuers' lock: a void never interleaves with an issue that reads this customer's invoices.
    sqlx::query("SELECT 1 FROM customers WHERE customer_id = $1 FOR UPDATE")
        .bind(&customer_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE invoices SET status = 'void', voided_at = $2, void_reason = $3
         WHERE invoice_id = $1 AND status = 'issued'",
    )
    .bind(invoice_id)
    .bind(now)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    let invoice = get_invoice(&mut tx, invoice_id).await?;
    tx.commit().await?;
    Ok(invoice)
}
