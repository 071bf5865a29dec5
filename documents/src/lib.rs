//! Invoice documents (SPEC §6, `GET /api/v1/invoices/{id}/document`): an issued or voided invoice and its
//! customer rendered as a printable, self-contained HTML page or as an A4 PDF, both in-process and
//! without I/O. Both say the same thing: they are drawn from one [`view`] of the invoice.
//!
//! | file | owns |
//! |---|---|
//! | `lib.rs` | the two entry points, [`render_html`] and [`render_pdf`] |
//! | `view.rs` | what a document says, as plain text: the one place that decides content |
//! | `format.rs` | amounts (`1,234.50 USD`, `−12.00 USD`), exact quantities, UTC dates and periods |
//! | `html.rs` | the HTML5 page: inline CSS, A4 print styles, every data string escaped |
//! | `pdf.rs` | the PDF: layout, pagination with repeated table headers, footers, pdf-writer objects |
//! | `winansi.rs` | text for the standard Helvetica fonts: WinAnsi encoding, glyph widths, wrapping |
//! | `sample.rs` | a made-up customer and a typical invoice for examples, benchmarks and tests |

mod format;
mod html;
mod pdf;
pub mod sample;
mod view;
mod winansi;

use meterflow_model::{Customer, Invoice};

/// The invoice as one self-contained HTML5 page (UTF-8, inline CSS, no script, nothing fetched), laid
/// out as an A4 sheet on screen and printing on A4. A voided invoice carries a VOID mark.
pub fn render_html(invoice: &Invoice, customer: &Customer) -> String {
    html::render(&view::View::new(invoice, customer))
}

/// The invoice as a PDF of one or more A4 pages, with the standard Helvetica fonts (nothing embedded).
/// Characters outside WinAnsiEncoding are folded to a close form (`−` → `-`) or shown as `?`.
pub fn render_pdf(invoice: &Invoice, customer: &Customer) -> Vec<u8> {
    pdf::render(&view::View::new(invoice, customer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterflow_model::InvoiceStatus;
    use rust_decimal::Decimal;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    /// Whether the PDF shows `text` in one piece: pdf-writer writes ASCII as a literal string
    /// (balanced parentheses unescaped) and anything else as a hex string of its WinAnsi bytes.
    fn shows(pdf: &[u8], text: &str) -> bool {
        let bytes = winansi::encode(text);
        if bytes.is_ascii() {
            contains(pdf, format!("({text})").as_bytes())
        } else {
            let hex: String = bytes.iter().map(|b| format!("{b:02X}")).collect();
            contains(pdf, format!("<{hex}>").as_bytes())
        }
    }

    /// Every text position (`x y Td`) is on the page, and only the footers (two per page) sit in
    /// the bottom margin.
    fn assert_no_text_below_the_footer(pdf: &[u8]) {
        let text = String::from_utf8_lossy(pdf);
        let mut in_margin = 0;
        for (at, _) in text.match_indices(" Td\n") {
            let before: Vec<f32> = text[..at]
                .rsplit(['\n', ' '])
                .take(2)
                .map(|n| n.parse().unwrap())
                .collect();
            let (x, y) = (before[1], before[0]);
            assert!(
                (0.0..595.28).contains(&x) && (38.0..841.89).contains(&y),
                "{x} {y}"
            );
            in_margin += usize::from(y < 60.0);
        }
        assert_eq!(in_margin, 2 * pages(pdf));
    }

    /// The number of page objects (`/Type /Page`, not `/Pages`).
    fn pages(pdf: &[u8]) -> usize {
        count(pdf, b"/Type /Page\n") + count(pdf, b"/Type /Page ") + count(pdf, b"/Type /Page/")
    }

    /// Checks what a reader needs to open the file: header, the xref table that `startxref` points
    /// at, every in-use entry pointing at its `N 0 obj`, the trailer and the end marker.
    fn assert_valid_pdf(pdf: &[u8]) {
        fn number(bytes: &[u8]) -> usize {
            let digits: Vec<u8> = bytes
                .iter()
                .skip_while(|b| b.is_ascii_whitespace())
                .take_while(|b| b.is_ascii_digit())
                .copied()
                .collect();
            String::from_utf8(digits).unwrap().parse().unwrap()
        }
        assert!(pdf.starts_with(b"%PDF-1."), "header");
        assert!(pdf.trim_ascii_end().ends_with(b"%%EOF"), "end marker");
        let startxref = pdf
            .windows(9)
            .rposition(|w| w == b"startxref")
            .expect("startxref");
        let offset = number(&pdf[startxref + 9..]);
        let xref = &pdf[offset..];
        assert!(
            xref.starts_with(b"xref"),
            "startxref points at the xref table"
        );
        let text = std::str::from_utf8(&xref[..xref.len().min(200_000)]).expect("an ASCII xref");
        let mut lines = text.lines().skip(1);
        let mut header = lines.next().unwrap().split_whitespace();
        assert_eq!(header.next(), Some("0"));
        let n: usize = header.next().unwrap().parse().unwrap();
        for (id, entry) in lines.by_ref().take(n).enumerate() {
            let fields: Vec<&str> = entry.split_whitespace().collect();
            if fields[2] == "n" {
                let at: usize = fields[0].parse().unwrap();
                assert!(
                    pdf[at..].starts_with(format!("{id} 0 obj").as_bytes()),
                    "xref entry {id} points at its object"
                );
            }
        }
        assert!(text.contains("trailer"), "trailer");
        assert!(text.contains("/Root 1 0 R"), "trailer names the catalog");
        assert!(
            text.contains(&format!("/Size {n}")),
            "trailer gives the size"
        );
    }

    #[test]
    fn the_html_shows_the_invoice_with_its_amounts_in_the_currency_format() {
        let invoice = sample::invoice(10, 2, "USD");
        let html = render_html(&invoice, &sample::customer());
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("<meta charset=\"utf-8\">"));
        assert!(html.contains("@media print") && html.contains("size: A4"));
        assert!(html.contains(">meterflow<"));
        assert!(html.contains(">1042<"));
        assert!(html.contains("c1a5e0d4-93f2-4b7a-8e61-5f2d0c9b7a31"));
        assert!(html.contains("1 – 31 January 2024"));
        assert!(html.contains("1 February 2024"));
        assert!(html.contains("Nordlicht Analytics GmbH"));
        assert!(html.contains("Friedrichstraße 123</p>"));
        assert!(html.contains("billing@nordlicht.example"));
        assert_eq!(html.matches("<tr><td>").count(), 10 + 2);
        assert!(html.contains("minimum top-up"));
        // api_calls: 1,003,440 calls at 0.005; storage: 1,082.758 GB-months at 0.023.
        assert!(html.contains(">1,003,440<") && html.contains(">5,017.20 USD<"));
        assert!(html.contains(">1,082.758<") && html.contains(">24.90 USD<"));
        let subtotal = invoice.line_items.iter().map(|l| l.amount).sum::<Decimal>();
        assert_eq!(invoice.subtotal, subtotal);
        assert!(html.contains(&format!(
            ">{} USD<",
            format::money(subtotal, "USD").trim_end_matches(" USD")
        )));
        assert!(html.contains(">123.45 USD<") && html.contains(">\u{2212}30.75 USD<"));
        assert!(html.contains(">92.70 USD<"), "adjustments total");
        assert!(html.contains("Total due"));
        assert!(!html.contains("<script") && !html.contains("http"));
    }

    #[test]
    fn amounts_follow_the_minor_unit_of_the_currency() {
        let customer = sample::customer();
        let mut jpy = sample::invoice(3, 0, "JPY");
        jpy.line_items[0].amount = d("1234567");
        jpy.subtotal = d("1234567");
        jpy.total = d("1234567");
        let html = render_html(&jpy, &customer);
        assert!(html.contains(">1,234,567 JPY<"));
        assert!(!html.contains("1,234,567.00"));

        let mut kwd = sample::invoice(3, 0, "KWD");
        kwd.line_items[0].amount = d("1234.5");
        kwd.total = d("1234.5");
        let html = render_html(&kwd, &customer);
        assert!(html.contains(">1,234.500 KWD<"));
    }

    #[test]
    fn a_negative_total_is_shown_as_a_credit() {
        let mut invoice = sample::invoice(2, 1, "USD");
        invoice.adjustments[0].amount = d("-50000");
        invoice.total = invoice.subtotal - d("50000");
        assert!(invoice.total < Decimal::ZERO);
        let html = render_html(&invoice, &sample::customer());
        let credit = format::money(-invoice.total, "USD");
        assert!(html.contains("Total (credit)"));
        assert!(html.contains(&format!(">\u{2212}{credit}<")));
        assert!(html.contains(&format!(
            "Nothing to pay: this invoice is a credit of {credit}."
        )));
        assert!(!html.contains("Total due"));
        let pdf = render_pdf(&invoice, &sample::customer());
        assert!(shows(&pdf, "Total (credit)"));
        assert!(shows(&pdf, &format!("-{credit}")));
        assert!(shows(
            &pdf,
            &format!("Nothing to pay: this invoice is a credit of {credit}.")
        ));
    }

    #[test]
    fn every_data_string_is_escaped_in_the_html() {
        let mut customer = sample::customer();
        customer.name = "<script>alert('x')</script> & Sons".to_owned();
        customer.email = Some("\"a\"@example.com".to_owned());
        customer.address = Some("<b>bold</b>".to_owned());
        let mut invoice = sample::invoice(2, 1, "USD");
        invoice.line_items[0].description = "<img src=x onerror=alert(1)>".to_owned();
        invoice.line_items[1].meter = "</td><td>".to_owned();
        invoice.line_items[1].unit_price_summary = "a < b".to_owned();
        invoice.adjustments[0].reason = "<i>".to_owned();
        invoice.adjustments[0].original_invoice_id = "\"><script>".to_owned();
        invoice.invoice_id = "<id>".to_owned();
        let html = render_html(&invoice, &customer);
        assert!(!html.contains("<script"));
        assert!(!html.contains("<img") && !html.contains("<b>") && !html.contains("<i>"));
        assert!(!html.contains("<id>") && !html.contains("<tr><td></td><td>"));
        assert!(html.contains("&lt;/td&gt;&lt;td&gt;"));
        assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; Sons"));
        assert!(html.contains("&quot;a&quot;@example.com"));
        assert!(html.contains("a &lt; b"));
    }

    #[test]
    fn awkward_text_still_makes_a_valid_pdf() {
        let mut customer = sample::customer();
        customer.name = "Ünïcødé (東京) \\ ) ( Ltd — «Sp. z o.o.» Łódź".to_owned();
        customer.email = Some(String::new());
        customer.address = Some("\n\n  line one  \r\nline\ttwo\n".repeat(5));
        let mut invoice = sample::invoice(3, 1, "KWD");
        invoice.line_items[0].description = "x".repeat(2_000);
        invoice.line_items[1].meter = String::new();
        invoice.adjustments[0].reason = "))))((((".to_owned();
        let pdf = render_pdf(&invoice, &customer);
        assert_valid_pdf(&pdf);
        // 2,000 letters at 9 pt in a 120-point column: about 80 lines, more than a page holds,
        // so the row runs on to the next page rather than off the bottom of the first.
        assert!(pages(&pdf) >= 2);
        assert_no_text_below_the_footer(&pdf);
        assert!(shows(&pdf, "Ünïcødé (??) \\ ) ( Ltd — «Sp. z o.o.» Lódz"));
        assert!(shows(&pdf, "line two"));
        let html = render_html(&invoice, &customer);
        assert!(html.contains("Ünïcødé (東京) \\ ) ( Ltd — «Sp. z o.o.» Łódź"));
        assert_eq!(html.matches("<p>line\ttwo</p>").count(), 5);
    }

    #[test]
    fn a_void_invoice_carries_a_void_mark_and_an_issued_one_does_not() {
        let mut invoice = sample::invoice(3, 0, "USD");
        let customer = sample::customer();
        let issued = render_html(&invoice, &customer);
        assert!(!issued.contains(">VOID") && !issued.contains("class=\"void-mark\""));
        assert!(!contains(&render_pdf(&invoice, &customer), b"(VOID)"));

        invoice.status = InvoiceStatus::Void;
        let html = render_html(&invoice, &customer);
        assert!(html.contains("<div class=\"void-mark\" aria-hidden=\"true\">VOID</div>"));
        assert!(html.contains("class=\"status-void\">VOID<"));
        assert!(html.contains("It is not payable"));
        let pdf = render_pdf(&invoice, &customer);
        assert_eq!(count(&pdf, b"(VOID)"), 2, "watermark and status");
        assert!(shows(
            &pdf,
            "VOID \u{2014} this invoice has been voided. It is not payable and is kept for the record only."
        ));
        assert!(html.contains(">Total<") && !html.contains("Total due"));
    }

    #[test]
    fn the_adjustments_section_appears_only_when_there_are_adjustments() {
        let customer = sample::customer();
        let none = sample::invoice(4, 0, "USD");
        let html = render_html(&none, &customer);
        assert!(!html.contains("Adjustments"));
        assert!(!contains(&render_pdf(&none, &customer), b"ADJUSTMENTS"));

        let some = sample::invoice(4, 2, "USD");
        let html = render_html(&some, &customer);
        assert!(html.contains("Adjustments to earlier invoices"));
        assert!(html.contains("<th>Adjustments</th>"));
        assert!(html.contains("7f3c2a9e-41b0-4c55-9d2e-0a6b1c000100"));
        assert!(html.contains(">December 2023<"));
        assert!(html.contains("Late usage after the invoice was issued"));
        assert!(contains(
            &render_pdf(&some, &customer),
            b"(ADJUSTMENTS TO EARLIER INVOICES)"
        ));
    }

    #[test]
    fn an_invoice_without_lines_says_so() {
        let invoice = sample::invoice(0, 0, "USD");
        let html = render_html(&invoice, &sample::customer());
        assert!(html.contains("No usage was billed in this period."));
        assert!(html.contains(">0.00 USD<"));
        assert_valid_pdf(&render_pdf(&invoice, &sample::customer()));
    }

    #[test]
    fn the_pdf_is_a_well_formed_one_page_a4_document_with_the_text() {
        let invoice = sample::invoice(10, 2, "USD");
        let pdf = render_pdf(&invoice, &sample::customer());
        assert_valid_pdf(&pdf);
        assert_eq!(pages(&pdf), 1);
        assert!(contains(&pdf, b"/MediaBox [0 0 595.28 841.89]"));
        assert!(contains(&pdf, b"/BaseFont /Helvetica"));
        assert!(contains(&pdf, b"/BaseFont /Helvetica-Bold"));
        assert!(contains(&pdf, b"/Encoding /WinAnsiEncoding"));
        assert!(!contains(&pdf, b"/FontFile"), "nothing embedded");
        for text in [
            "meterflow",
            "INVOICE",
            "1042",
            "c1a5e0d4-93f2-4b7a-8e61-5f2d0c9b7a31",
            "1 February 2024",
            "Issued",
            "Nordlicht Analytics GmbH",
            "billing@nordlicht.example",
            "Friedrichstraße 123",
            "Customer ID cust_00042",
            "1 – 31 January 2024",
            "api_calls",
            "1,003,440",
            "5,017.20 USD",
            "1,082.758",
            "minimum top-up",
            "December 2023",
            "-30.75 USD",
            "92.70 USD",
            "Total due",
            "12,745.24 USD",
            "Page 1 of 1",
        ] {
            assert!(shows(&pdf, text), "{text}");
        }
        assert!(!shows(&pdf, "VOID"));
    }

    #[test]
    fn a_long_invoice_runs_over_several_pages_each_with_the_table_header_and_a_page_number() {
        let invoice = sample::invoice(300, 2, "USD");
        let pdf = render_pdf(&invoice, &sample::customer());
        assert_valid_pdf(&pdf);
        assert_no_text_below_the_footer(&pdf);
        let n = pages(&pdf);
        assert!(n >= 5, "{n} pages for 300 lines");
        for i in 1..=n {
            assert!(contains(&pdf, format!("(Page {i} of {n})").as_bytes()));
        }
        // The lines' header opens every page that has lines, all but possibly the last; the
        // adjustments' header is on one page.
        let lines_headers = count(&pdf, b"(DESCRIPTION)");
        assert!(lines_headers >= n - 1, "{lines_headers} of {n} pages");
        assert_eq!(count(&pdf, b"(ORIGINAL INVOICE)"), 1);
        assert_eq!(
            count(&pdf, b"(INVOICE)"),
            1,
            "the title, on the first page only"
        );
        let continued = "meterflow \u{b7} Invoice 1042 (continued)";
        let hex: String = winansi::encode(continued)
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect();
        assert_eq!(
            count(&pdf, hex.as_bytes()),
            n - 1,
            "a running header after page 1"
        );
        // Every line is there once.
        assert!(contains(&pdf, b"(egress_gb_49)"));
        assert_eq!(count(&pdf, b"(api_calls_"), 49);
        assert!(shows(&pdf, &format::money(invoice.total, "USD")));
    }
}
