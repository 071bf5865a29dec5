//! Writes the sample invoice (10 lines, 2 adjustments) as HTML and PDF to look at:
//! `/tmp/meterflow-invoice.{html,pdf}`, a voided 300-line one as `/tmp/meterflow-invoice-long.{html,pdf}`
//! and a JPY credit note as `/tmp/meterflow-invoice-credit.{html,pdf}`.
//!
//!     cargo run -p meterflow-documents --example render

use meterflow_documents::{render_html, render_pdf, sample};
use meterflow_model::InvoiceStatus;
use rust_decimal::Decimal;

fn main() -> std::io::Result<()> {
    let customer = sample::customer();
    let typical = sample::invoice(10, 2, "USD");

    let mut long = sample::invoice(300, 2, "USD");
    long.status = InvoiceStatus::Void;

    let mut credit = sample::invoice(3, 1, "JPY");
    credit.adjustments[0].amount = Decimal::new(-250_000, 0);
    credit.total = credit.subtotal + credit.adjustments[0].amount;

    for (name, invoice) in [("", &typical), ("-long", &long), ("-credit", &credit)] {
        let base = format!("/tmp/meterflow-invoice{name}");
        std::fs::write(format!("{base}.html"), render_html(invoice, &customer))?;
        std::fs::write(format!("{base}.pdf"), render_pdf(invoice, &customer))?;
        println!("{base}.html {base}.pdf");
    }
    Ok(())
}
