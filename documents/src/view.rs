//! What an invoice document says, as plain text, decided once for both the HTML and the PDF: so the
//! two always agree. Strings are not escaped here; each renderer escapes or encodes them.

use meterflow_model::{Customer, Invoice, InvoiceStatus, LineKind};
use rust_decimal::Decimal;

use crate::format;

/// The seller named at the top of every document.
pub(crate) const SELLER: &str = "meterflow";

pub(crate) struct View<'a> {
    /// `Invoice 42`.
    pub title: String,
    pub number: String,
    pub invoice_id: &'a str,
    pub void: bool,
    /// `Issued` or `VOID`.
    pub status: &'static str,
    pub issued: String,
    pub period: String,
    pub currency: &'a str,
    pub customer_name: &'a str,
    pub customer_id: &'a str,
    pub email: Option<&'a str>,
    pub address: Vec<&'a str>,
    pub lines: Vec<LineView<'a>>,
    pub adjustments: Vec<AdjustmentView<'a>>,
    pub subtotal: String,
    /// Σ adjustments, when there are any.
    pub adjustments_total: Option<String>,
    /// `Total due`; `Total (credit)` when the total is negative; `Total` on a void invoice.
    pub total_label: &'static str,
    pub total: String,
    /// For a negative total: that nothing is due, and how much is credited.
    pub credit_note: Option<String>,
}

pub(crate) struct LineView<'a> {
    pub meter: &'a str,
    /// The line is the top-up to a price book's minimum, not usage.
    pub minimum: bool,
    pub description: &'a str,
    pub quantity: String,
    pub unit_price: &'a str,
    pub amount: String,
}

pub(crate) struct AdjustmentView<'a> {
    pub original_invoice_id: &'a str,
    pub period: String,
    pub meter: &'a str,
    pub reason: &'a str,
    pub amount: String,
}

impl<'a> View<'a> {
    pub fn new(invoice: &'a Invoice, customer: &'a Customer) -> Self {
        let currency = invoice.currency.as_str();
        let money = |amount| format::money(amount, currency);
        let void = invoice.status == InvoiceStatus::Void;
        let adjustments_total = (!invoice.adjustments.is_empty()).then(|| {
            invoice
                .adjustments
                .iter()
                .try_fold(Decimal::ZERO, |sum, a| sum.checked_add(a.amount))
                .map_or_else(|| "overflow".to_owned(), money)
        });
        let credit = invoice.total.is_sign_negative() && !invoice.total.is_zero();
        View {
            title: format!("Invoice {}", invoice.number),
            number: invoice.number.to_string(),
            invoice_id: &invoice.invoice_id,
            void,
            status: if void { "VOID" } else { "Issued" },
            issued: format::day_micros(invoice.issued_at),
            period: format::period(invoice.billing_period_start, invoice.billing_period_end),
            currency,
            customer_name: &customer.name,
            customer_id: &customer.customer_id,
            email: customer.email.as_deref().filter(|e| !e.trim().is_empty()),
            address: customer
                .address
                .as_deref()
                .unwrap_or("")
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect(),
            lines: invoice
                .line_items
                .iter()
                .map(|l| LineView {
                    meter: &l.meter,
                    minimum: l.kind == LineKind::Minimum,
                    description: &l.description,
                    quantity: format::quantity(l.quantity),
                    unit_price: &l.unit_price_summary,
                    amount: money(l.amount),
                })
                .collect(),
            adjustments: invoice
                .adjustments
                .iter()
                .map(|a| AdjustmentView {
                    original_invoice_id: &a.original_invoice_id,
                    period: format::period_from(a.period_start),
                    meter: &a.meter,
                    reason: &a.reason,
                    amount: money(a.amount),
                })
                .collect(),
            subtotal: money(invoice.subtotal),
            adjustments_total,
            total_label: match (void, credit) {
                (true, _) => "Total",
                (false, true) => "Total (credit)",
                (false, false) => "Total due",
            },
            total: money(invoice.total),
            credit_note: credit.then(|| {
                format!(
                    "Nothing to pay: this invoice is a credit of {}.",
                    money(-invoice.total)
                )
            }),
        }
    }
}
