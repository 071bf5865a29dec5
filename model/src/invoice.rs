//! Customers and invoices (SPEC §6): what an issued invoice holds. An issued invoice never changes;
//! later usage or price changes touching its period reach the customer's next invoice as adjustments.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

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
