//! The HTML invoice: one self-contained HTML5 page (inline CSS, no script, no external resource) that
//! reads on screen as an A4 sheet and prints on A4 (`@page`, `@media print`; table headers repeat on
//! every printed page). Every string that comes from data goes through [`Html::text`], which escapes it.

use crate::view::{View, SELLER};

const STYLE: &str = r#"
@page { size: A4; margin: 12mm 14mm; }
* { box-sizing: border-box; }
html { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
body { margin: 0; background: #eef0f3; color: #1c2330;
  font: 10pt/1.45 "Helvetica Neue", Helvetica, Arial, sans-serif; }
.sheet { position: relative; width: 210mm; min-height: 297mm; margin: 12mm auto; padding: 16mm 15mm;
  background: #fff; box-shadow: 0 1px 4px rgba(0,0,0,.15); }
.top { display: flex; justify-content: space-between; align-items: flex-start; gap: 12mm;
  padding-bottom: 4mm; border-bottom: 2px solid #1c2330; }
.seller { font-size: 20pt; font-weight: 700; letter-spacing: -.01em; }
h1 { margin: 0 0 2mm; font-size: 20pt; font-weight: 700; text-align: right; letter-spacing: .04em;
  text-transform: uppercase; }
dl.meta { display: grid; grid-template-columns: auto auto; gap: .6mm 6mm; margin: 0; font-size: 9pt; }
dl.meta dt { color: #5b6574; }
dl.meta dd { margin: 0; text-align: right; overflow-wrap: anywhere; }
.status-void { color: #b3261e; font-weight: 700; }
.void-banner { margin: 5mm 0 0; padding: 2.5mm 4mm; border: 1.5px solid #b3261e; color: #b3261e;
  font-weight: 700; }
.void-mark { position: fixed; top: 42%; left: 0; right: 0; text-align: center; font-size: 130pt;
  font-weight: 800; letter-spacing: .12em; color: rgba(179,38,30,.16); transform: rotate(-32deg);
  pointer-events: none; z-index: 1; }
.parties { display: flex; justify-content: space-between; gap: 12mm; margin: 5mm 0 6mm; }
.parties > div { min-width: 0; }
h2 { margin: 0 0 1.5mm; font-size: 8pt; font-weight: 700; letter-spacing: .08em; text-transform: uppercase;
  color: #5b6574; }
.bill-to p, .terms p { margin: 0; overflow-wrap: anywhere; }
.bill-to .name { font-size: 11pt; font-weight: 700; }
.terms { text-align: right; }
.terms p + h2 { margin-top: 3mm; }
.muted { color: #5b6574; font-size: 8.5pt; }
table { width: 100%; border-collapse: collapse; }
table.items { margin-bottom: 5mm; table-layout: fixed; font-size: 9pt; line-height: 1.3; }
table.items thead { display: table-header-group; }
table.items th { padding: 1.6mm 2mm; background: #eef0f3; font-size: 8pt; font-weight: 700;
  letter-spacing: .06em; text-transform: uppercase; color: #3c4553; text-align: left; }
table.items td { padding: 1.5mm 2mm; border-bottom: 1px solid #dde1e6; vertical-align: top;
  overflow-wrap: anywhere; }
table.items tr { break-inside: avoid; }
.num { text-align: right !important; font-variant-numeric: tabular-nums; }
.tag { display: block; color: #5b6574; font-size: 8pt; }
.empty { color: #5b6574; text-align: center; }
h2.section { margin-top: 2mm; }
.summary { display: flex; justify-content: flex-end; break-inside: avoid; }
table.totals { width: auto; min-width: 85mm; }
table.totals th { padding: 1.2mm 6mm 1.2mm 0; text-align: left; font-weight: 400; color: #3c4553; }
table.totals td { padding: 1.2mm 0; }
table.totals tr.total th, table.totals tr.total td { padding-top: 2.5mm; border-top: 2px solid #1c2330;
  font-size: 12pt; font-weight: 700; color: #1c2330; }
.credit-note { margin: 2mm 0 0; text-align: right; color: #3c4553; }
footer { margin-top: 8mm; padding-top: 3mm; border-top: 1px solid #dde1e6; color: #5b6574;
  font-size: 8pt; }
@media print {
  body { background: none; }
  .sheet { width: auto; min-height: 0; margin: 0; padding: 0; box-shadow: none; }
  footer { margin-top: 5mm; }
}
"#;

/// A string being built as HTML: [`raw`](Html::raw) for markup, [`text`](Html::text) for data.
struct Html(String);

impl Html {
    fn raw(&mut self, markup: &str) -> &mut Self {
        self.0.push_str(markup);
        self
    }

    /// Escapes `&`, `<`, `>`, `"` and `'`: safe in element content and in quoted attributes.
    fn text(&mut self, text: &str) -> &mut Self {
        for c in text.chars() {
            match c {
                '&' => self.0.push_str("&amp;"),
                '<' => self.0.push_str("&lt;"),
                '>' => self.0.push_str("&gt;"),
                '"' => self.0.push_str("&quot;"),
                '\'' => self.0.push_str("&#39;"),
                c => self.0.push(c),
            }
        }
        self
    }

    /// `<tag class="…">text</tag>`; the class, if any, is a literal of this module.
    fn element(&mut self, tag: &str, class: &str, text: &str) -> &mut Self {
        self.raw("<").raw(tag);
        if !class.is_empty() {
            self.raw(" class=\"").raw(class).raw("\"");
        }
        self.raw(">").text(text).raw("</").raw(tag).raw(">")
    }
}

pub(crate) fn render(view: &View<'_>) -> String {
    let mut h = Html(String::with_capacity(
        8 * 1024 + 600 * (view.lines.len() + view.adjustments.len()),
    ));
    h.raw("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n")
        .raw("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n")
        .raw("<title>")
        .text(&view.title)
        .raw(" \u{2014} ")
        .text(SELLER)
        .raw("</title>\n<style>")
        .raw(STYLE)
        .raw("</style>\n</head>\n<body>\n<main class=\"sheet\">\n");
    if view.void {
        h.raw("<div class=\"void-mark\" aria-hidden=\"true\">VOID</div>\n");
    }
    header(&mut h, view);
    parties(&mut h, view);
    lines(&mut h, view);
    adjustments(&mut h, view);
    totals(&mut h, view);
    h.raw("<footer>")
        .text(SELLER)
        .raw(" \u{b7} ")
        .text(&view.title)
        .raw(" \u{b7} ")
        .text(view.invoice_id)
        .raw(" \u{b7} amounts in ")
        .text(view.currency)
        .raw("</footer>\n</main>\n</body>\n</html>\n");
    h.0
}

fn header(h: &mut Html, view: &View<'_>) {
    h.raw("<header class=\"top\">\n<div class=\"seller\">")
        .text(SELLER)
        .raw("</div>\n<div>\n<h1>Invoice</h1>\n<dl class=\"meta\">\n");
    h.element("dt", "", "Invoice number")
        .element("dd", "", &view.number)
        .raw("\n");
    h.element("dt", "", "Invoice ID")
        .element("dd", "", view.invoice_id)
        .raw("\n");
    h.element("dt", "", "Issue date")
        .element("dd", "", &view.issued)
        .raw("\n");
    h.element("dt", "", "Status").element(
        "dd",
        if view.void { "status-void" } else { "" },
        view.status,
    );
    h.raw("\n</dl>\n</div>\n</header>\n");
    if view.void {
        h.raw("<p class=\"void-banner\">VOID \u{2014} this invoice has been voided. It is not payable and is kept for the record only.</p>\n");
    }
}

fn parties(h: &mut Html, view: &View<'_>) {
    h.raw("<section class=\"parties\">\n<div class=\"bill-to\">\n<h2>Bill to</h2>\n");
    h.element("p", "name", view.customer_name).raw("\n");
    if let Some(email) = view.email {
        h.element("p", "", email).raw("\n");
    }
    for line in &view.address {
        h.element("p", "", line).raw("\n");
    }
    h.raw("<p class=\"muted\">Customer ID ")
        .text(view.customer_id)
        .raw("</p>\n</div>\n<div class=\"terms\">\n<h2>Billing period</h2>\n");
    h.element("p", "", &view.period)
        .raw("\n<h2>Currency</h2>\n")
        .element("p", "", view.currency)
        .raw("\n</div>\n</section>\n");
}

fn lines(h: &mut Html, view: &View<'_>) {
    h.raw("<table class=\"items lines\">\n<colgroup><col style=\"width:20%\"><col style=\"width:26%\"><col style=\"width:14%\"><col style=\"width:23%\"><col style=\"width:17%\"></colgroup>\n<thead><tr><th>Meter</th><th>Description</th><th class=\"num\">Quantity</th><th>Unit price</th><th class=\"num\">Amount</th></tr></thead>\n<tbody>\n");
    if view.lines.is_empty() {
        h.raw(
            "<tr><td colspan=\"5\" class=\"empty\">No usage was billed in this period.</td></tr>\n",
        );
    }
    for line in &view.lines {
        h.raw("<tr><td>").text(line.meter);
        if line.minimum {
            h.raw("<span class=\"tag\">minimum top-up</span>");
        }
        h.raw("</td>")
            .element("td", "", line.description)
            .element("td", "num", &line.quantity)
            .element("td", "", line.unit_price)
            .element("td", "num", &line.amount)
            .raw("</tr>\n");
    }
    h.raw("</tbody>\n</table>\n");
}

fn adjustments(h: &mut Html, view: &View<'_>) {
    if view.adjustments.is_empty() {
        return;
    }
    h.raw("<h2 class=\"section\">Adjustments to earlier invoices</h2>\n<table class=\"items adjustments\">\n<colgroup><col style=\"width:26%\"><col style=\"width:17%\"><col style=\"width:20%\"><col style=\"width:20%\"><col style=\"width:17%\"></colgroup>\n<thead><tr><th>Original invoice</th><th>Period</th><th>Meter</th><th>Reason</th><th class=\"num\">Amount</th></tr></thead>\n<tbody>\n");
    for a in &view.adjustments {
        h.raw("<tr>")
            .element("td", "", a.original_invoice_id)
            .element("td", "", &a.period)
            .element("td", "", a.meter)
            .element("td", "", a.reason)
            .element("td", "num", &a.amount)
            .raw("</tr>\n");
    }
    h.raw("</tbody>\n</table>\n");
}

fn totals(h: &mut Html, view: &View<'_>) {
    h.raw("<section class=\"summary\">\n<div>\n<table class=\"totals\">\n<tr><th>Subtotal</th>")
        .element("td", "num", &view.subtotal)
        .raw("</tr>\n");
    if let Some(adjustments) = &view.adjustments_total {
        h.raw("<tr><th>Adjustments</th>")
            .element("td", "num", adjustments)
            .raw("</tr>\n");
    }
    h.raw("<tr class=\"total\">")
        .element("th", "", view.total_label)
        .element("td", "num", &view.total)
        .raw("</tr>\n</table>\n");
    if let Some(note) = &view.credit_note {
        h.element("p", "credit-note", note).raw("\n");
    }
    h.raw("</div>\n</section>\n");
}
