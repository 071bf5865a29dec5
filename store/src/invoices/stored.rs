//! Stored invoices: listed a page at a time, read one by one with their adjustments, and voided (the
//! status flips to `void`, which frees the period to be issued again; nothing is deleted).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use meterflow_model::{Adjustment, Dimensions, Invoice, InvoiceLine, InvoiceStatus};
use rust_decimal::Decimal;
use sqlx::types::Json;
use sqlx::{Connection, PgConnection};

use super::StoredInvoice;

/// The id of the invoice issued to `customer_id` for the period starting at `period_start`, if any.
pub async fn issued_invoice_id(
    conn: &mut PgConnection,
    customer_id: &str,
    period_start: DateTime<Utc>,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT invoice_id FROM invoices
         WHERE customer_id = $1 AND billing_period_start = $2 AND status = 'issued'",
        customer_id,
        period_start,
    )
    .fetch_optional(&mut *conn)
    .await
}

/// An `invoices` row as the queries select it (every query names these columns, checked by sqlx); the
/// lines decode from their JSON.
struct InvoiceRow {
    invoice_id: String,
    number: i64,
    customer_id: String,
    billing_period_start: DateTime<Utc>,
    billing_period_end: DateTime<Utc>,
    status: String,
    currency: String,
    subtotal: Decimal,
    total: Decimal,
    issued_at: DateTime<Utc>,
    voided_at: Option<DateTime<Utc>>,
    void_reason: Option<String>,
    line_items: Json<Vec<InvoiceLine>>,
}

impl From<InvoiceRow> for StoredInvoice {
    fn from(row: InvoiceRow) -> Self {
        StoredInvoice {
            invoice: Invoice {
                invoice_id: row.invoice_id,
                number: row.number,
                customer_id: row.customer_id,
                billing_period_start: row.billing_period_start.timestamp(),
                billing_period_end: row.billing_period_end.timestamp(),
                status: if row.status == "void" {
                    InvoiceStatus::Void
                } else {
                    InvoiceStatus::Issued
                },
                currency: row.currency,
                line_items: row.line_items.0,
                adjustments: Vec::new(),
                subtotal: row.subtotal,
                total: row.total,
                issued_at: row.issued_at.timestamp_micros(),
            },
            voided_at: row.voided_at,
            void_reason: row.void_reason,
        }
    }
}

/// An `invoice_adjustments` row as [`with_details`] selects it: the adjustment and its invoice.
struct AdjustmentRow {
    invoice_id: String,
    original_invoice_id: String,
    period_start: DateTime<Utc>,
    meter: String,
    dimensions: Json<Dimensions>,
    price_book_id: String,
    amount: Decimal,
    reason: String,
}

impl From<AdjustmentRow> for Adjustment {
    fn from(row: AdjustmentRow) -> Self {
        Adjustment {
            original_invoice_id: row.original_invoice_id,
            period_start: row.period_start.timestamp(),
            meter: row.meter,
            dimensions: row.dimensions.0,
            price_book_id: row.price_book_id,
            amount: row.amount,
            reason: row.reason,
        }
    }
}

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
    let rows = sqlx::query_as!(
        InvoiceRow,
        r#"SELECT invoice_id, number, customer_id, billing_period_start, billing_period_end, status,
                  currency, subtotal, total, issued_at, voided_at, void_reason,
                  line_items AS "line_items: Json<Vec<InvoiceLine>>"
           FROM invoices
           WHERE ($1::text IS NULL OR customer_id = $1)
             AND ($2::timestamptz IS NULL OR billing_period_start >= $2)
             AND ($3::timestamptz IS NULL OR billing_period_start < $3)
             AND ($4::text IS NULL OR status = $4)
             AND ($5::bigint IS NULL OR number > $5)
           ORDER BY number LIMIT $6"#,
        filter.customer_id,
        filter.from,
        filter.to,
        filter.status.map(InvoiceStatus::as_str),
        filter.after_number,
        filter.limit,
    )
    .fetch_all(&mut *conn)
    .await?;
    with_details(conn, rows.into_iter().map(StoredInvoice::from).collect()).await
}

pub async fn get_invoice(
    conn: &mut PgConnection,
    invoice_id: &str,
) -> Result<Option<StoredInvoice>, sqlx::Error> {
    let rows = sqlx::query_as!(
        InvoiceRow,
        r#"SELECT invoice_id, number, customer_id, billing_period_start, billing_period_end, status,
                  currency, subtotal, total, issued_at, voided_at, void_reason,
                  line_items AS "line_items: Json<Vec<InvoiceLine>>"
           FROM invoices WHERE invoice_id = $1"#,
        invoice_id,
    )
    .fetch_all(&mut *conn)
    .await?;
    let invoices = rows.into_iter().map(StoredInvoice::from).collect();
    Ok(with_details(conn, invoices).await?.pop())
}

/// `invoices` with their adjustments (one statement for all of them).
async fn with_details(
    conn: &mut PgConnection,
    mut invoices: Vec<StoredInvoice>,
) -> Result<Vec<StoredInvoice>, sqlx::Error> {
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
    let adjustments = sqlx::query_as!(
        AdjustmentRow,
        r#"SELECT invoice_id, original_invoice_id, period_start, meter,
                dimensions AS "dimensions: Json<Dimensions>", price_book_id, amount, reason
         FROM invoice_adjustments WHERE invoice_id = ANY($1) ORDER BY invoice_id, position"#,
        &ids,
    )
    .fetch_all(&mut *conn)
    .await?;
    for row in adjustments {
        if let Some(issued) = at.get(&row.invoice_id).and_then(|i| invoices.get_mut(*i)) {
            issued.invoice.adjustments.push(row.into());
        }
    }
    Ok(invoices)
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
    let customer_id = sqlx::query_scalar!(
        "SELECT customer_id FROM invoices WHERE invoice_id = $1",
        invoice_id,
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(customer_id) = customer_id else {
        return Ok(None);
    };
    // The issuers' lock: a void never interleaves with an issue that reads this customer's invoices.
    sqlx::query!(
        "SELECT FROM customers WHERE customer_id = $1 FOR UPDATE",
        customer_id,
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "UPDATE invoices SET status = 'void', voided_at = $2, void_reason = $3
         WHERE invoice_id = $1 AND status = 'issued'",
        invoice_id,
        now,
        reason,
    )
    .execute(&mut *tx)
    .await?;
    let invoice = get_invoice(&mut tx, invoice_id).await?;
    tx.commit().await?;
    Ok(invoice)
}
