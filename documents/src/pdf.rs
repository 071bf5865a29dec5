//! The PDF invoice: the same content as the HTML, laid out on A4 pages with the standard Type1 fonts
//! Helvetica and Helvetica-Bold in WinAnsiEncoding (every PDF viewer has them: nothing is embedded).
//!
//! ```text
//!   View ──▶ Layout (one content stream per page; a table row that does not fit starts a new page,
//!            │        which repeats the table's header; the totals stay together)
//!            ▼
//!   footers ("Page i of n", now that n is known) ──▶ pdf-writer objects ──▶ bytes
//! ```
//! Page 1 carries the header, the parties and the start of the lines; later pages a running header.
//! A voided invoice has a large diagonal VOID under the content of every page.

use pdf_writer::{Content, Finish, Name, Pdf, Rect, Ref, Str, TextStr};

use crate::view::{View, SELLER};
use crate::winansi::{encode, width, wrap, Face};

const PAGE_W: f32 = 595.28;
const PAGE_H: f32 = 841.89;
const LEFT: f32 = 50.0;
const RIGHT: f32 = PAGE_W - 50.0;
/// Where the content of a page starts, and the lowest it may reach (the footer is below).
const TOP: f32 = 792.0;
const BOTTOM: f32 = 70.0;
/// The left edge of the right-hand blocks (invoice details, period, totals).
const SIDE_X: f32 = 300.0;

const REGULAR: Name = Name(b"F1");
const BOLD: Name = Name(b"F2");

type Rgb = (f32, f32, f32);
const INK: Rgb = (0.11, 0.14, 0.19);
const MUTED: Rgb = (0.36, 0.40, 0.45);
const RULE: Rgb = (0.85, 0.87, 0.90);
const BAND: Rgb = (0.93, 0.94, 0.95);
const RED: Rgb = (0.70, 0.15, 0.12);
const WATERMARK: Rgb = (0.97, 0.84, 0.83);

/// Table text: size, line height, and the padding above and below a row's text.
const CELL_SIZE: f32 = 9.0;
const CELL_LEADING: f32 = 11.5;
const NOTE_SIZE: f32 = 7.5;
const CELL_PAD_X: f32 = 4.0;
const CELL_PAD_Y: f32 = 4.0;
const HEADER_H: f32 = 18.0;

struct Column {
    title: &'static str,
    width: f32,
    right: bool,
}

/// One table cell: its text, and an optional small note under it.
struct Cell<'a> {
    text: &'a str,
    note: Option<&'static str>,
}

fn cell(text: &str) -> Cell<'_> {
    Cell { text, note: None }
}

/// A row wrapped to its columns' widths: each cell's lines, then its note if any, one slot each.
struct Row {
    cells: Vec<Wrapped>,
    slots: usize,
}

/// A cell's text broken into lines, and its note.
struct Wrapped {
    lines: Vec<Vec<u8>>,
    note: Option<Vec<u8>>,
}

/// The height of `slots` lines of a row, padding included.
fn row_height(slots: usize) -> f32 {
    slots as f32 * CELL_LEADING + 2.0 * CELL_PAD_Y
}

const fn column(title: &'static str, width: f32, right: bool) -> Column {
    Column {
        title,
        width,
        right,
    }
}

// Each table spans RIGHT − LEFT = 495.28 points.
const LINE_COLUMNS: [Column; 5] = [
    column("Meter", 100.0, false),
    column("Description", 128.0, false),
    column("Quantity", 70.0, true),
    column("Unit price", 112.0, false),
    column("Amount", 85.28, true),
];

const ADJUSTMENT_COLUMNS: [Column; 5] = [
    column("Original invoice", 130.0, false),
    column("Period", 80.0, false),
    column("Meter", 100.0, false),
    column("Reason", 100.0, false),
    column("Amount", 85.28, true),
];

/// Pages being laid out, top to bottom; `y` is the top of the free space on the last page.
struct Layout {
    pages: Vec<Content>,
    y: f32,
    void: bool,
    /// The running header of pages after the first.
    continued: Vec<u8>,
}

pub(crate) fn render(view: &View<'_>) -> Vec<u8> {
    let mut layout = Layout {
        pages: Vec::new(),
        y: TOP,
        void: view.void,
        continued: encode(&format!("{SELLER} \u{b7} {} (continued)", view.title)),
    };
    layout.new_page();
    layout.header(view);
    layout.parties(view);
    layout.lines(view);
    layout.adjustments(view);
    layout.totals(view);
    let footer = encode(&format!(
        "{SELLER} \u{b7} {} \u{b7} {}",
        view.title, view.invoice_id
    ));
    let count = layout.pages.len();
    for (i, page) in layout.pages.iter_mut().enumerate() {
        footer_of(page, &footer, i + 1, count);
    }
    write(layout.pages, &view.title)
}

impl Layout {
    fn page(&mut self) -> &mut Content {
        if self.pages.is_empty() {
            self.pages.push(Content::new());
        }
        let last = self.pages.len() - 1;
        &mut self.pages[last]
    }

    fn new_page(&mut self) {
        let mut page = Content::new();
        if self.void {
            watermark(&mut page);
        }
        self.y = TOP;
        if !self.pages.is_empty() {
            show(
                &mut page,
                Face::Regular,
                8.5,
                LEFT,
                TOP - 6.0,
                MUTED,
                &self.continued,
            );
            self.y = TOP - 22.0;
        }
        self.pages.push(page);
    }

    /// Starts a new page unless `height` more fits on this one; says whether it did.
    fn room(&mut self, height: f32) -> bool {
        if self.y - height < BOTTOM {
            self.new_page();
            true
        } else {
            false
        }
    }

    fn text(&mut self, face: Face, size: f32, x: f32, y: f32, color: Rgb, text: &[u8]) {
        show(self.page(), face, size, x, y, color, text);
    }

    fn text_right(&mut self, face: Face, size: f32, right: f32, y: f32, color: Rgb, text: &[u8]) {
        let x = right - width(face, size, text);
        self.text(face, size, x, y, color, text);
    }

    fn rule(&mut self, x1: f32, x2: f32, y: f32, thickness: f32, color: Rgb) {
        self.page()
            .set_stroke_rgb(color.0, color.1, color.2)
            .set_line_width(thickness)
            .move_to(x1, y)
            .line_to(x2, y)
            .stroke();
    }

    fn fill(&mut self, x: f32, y: f32, w: f32, h: f32, color: Rgb) {
        self.page()
            .set_fill_rgb(color.0, color.1, color.2)
            .rect(x, y, w, h)
            .fill_nonzero();
    }

    /// Seller and document title on the left and right, the invoice's details under the title, a rule.
    fn header(&mut self, view: &View<'_>) {
        self.text(Face::Bold, 22.0, LEFT, TOP - 20.0, INK, SELLER.as_bytes());
        self.text_right(Face::Bold, 22.0, RIGHT, TOP - 20.0, INK, b"INVOICE");
        let mut y = TOP - 42.0;
        let status_color = if view.void { RED } else { INK };
        let status_face = if view.void { Face::Bold } else { Face::Regular };
        let rows: [(&[u8], &str, Rgb, Face); 4] = [
            (b"Invoice number", &view.number, INK, Face::Regular),
            (b"Invoice ID", view.invoice_id, INK, Face::Regular),
            (b"Issue date", &view.issued, INK, Face::Regular),
            (b"Status", view.status, status_color, status_face),
        ];
        for (label, value, color, face) in rows {
            self.text(Face::Regular, 9.0, SIDE_X, y, MUTED, label);
            let max = RIGHT - SIDE_X - width(Face::Regular, 9.0, label) - 12.0;
            for line in wrap(face, 9.0, &encode(value), max) {
                self.text_right(face, 9.0, RIGHT, y, color, &line);
                y -= 12.5;
            }
        }
        self.y = y - 4.0;
        self.rule(LEFT, RIGHT, self.y, 1.5, INK);
        self.y -= 18.0;
        if view.void {
            let text = encode(
                "VOID \u{2014} this invoice has been voided. It is not payable and is kept for the record only.",
            );
            let lines = wrap(Face::Bold, 9.5, &text, RIGHT - LEFT - 20.0);
            let h = 12.0 * lines.len() as f32 + 12.0;
            let top = self.y;
            self.page()
                .set_stroke_rgb(RED.0, RED.1, RED.2)
                .set_line_width(1.2)
                .rect(LEFT, top - h, RIGHT - LEFT, h)
                .stroke();
            let mut y = self.y - 16.0;
            for line in lines {
                self.text(Face::Bold, 9.5, LEFT + 10.0, y, RED, &line);
                y -= 12.0;
            }
            self.y -= h + 18.0;
        }
    }

    /// Bill-to on the left; billing period and currency on the right.
    fn parties(&mut self, view: &View<'_>) {
        let top = self.y;
        let left_w = SIDE_X - LEFT - 20.0;
        let mut y = top - 7.0;
        self.text(Face::Bold, 7.5, LEFT, y, MUTED, b"BILL TO");
        y -= 15.0;
        for line in wrap(Face::Bold, 11.0, &encode(view.customer_name), left_w) {
            self.text(Face::Bold, 11.0, LEFT, y, INK, &line);
            y -= 13.5;
        }
        for text in view.email.iter().chain(view.address.iter()) {
            for line in wrap(Face::Regular, 9.5, &encode(text), left_w) {
                self.text(Face::Regular, 9.5, LEFT, y, INK, &line);
                y -= 12.5;
            }
        }
        let id = encode(&format!("Customer ID {}", view.customer_id));
        for line in wrap(Face::Regular, 8.0, &id, left_w) {
            self.text(Face::Regular, 8.0, LEFT, y - 2.0, MUTED, &line);
            y -= 11.0;
        }
        let left_bottom = y;

        let mut y = top - 7.0;
        for (label, value) in [
            (&b"BILLING PERIOD"[..], view.period.as_str()),
            (b"CURRENCY", view.currency),
        ] {
            self.text_right(Face::Bold, 7.5, RIGHT, y, MUTED, label);
            y -= 15.0;
            for line in wrap(Face::Regular, 10.0, &encode(value), RIGHT - SIDE_X) {
                self.text_right(Face::Regular, 10.0, RIGHT, y, INK, &line);
                y -= 13.0;
            }
            y -= 8.0;
        }
        self.y = left_bottom.min(y) - 16.0;
    }

    fn lines(&mut self, view: &View<'_>) {
        let rows: Vec<[Cell<'_>; 5]> = view
            .lines
            .iter()
            .map(|l| {
                [
                    Cell {
                        text: l.meter,
                        note: l.minimum.then_some("minimum top-up"),
                    },
                    cell(l.description),
                    cell(&l.quantity),
                    cell(l.unit_price),
                    cell(&l.amount),
                ]
            })
            .collect();
        if rows.is_empty() {
            self.room(HEADER_H + 30.0);
            self.table_header(&LINE_COLUMNS);
            let y = self.y - 15.0;
            self.text(
                Face::Regular,
                9.0,
                LEFT + CELL_PAD_X,
                y,
                MUTED,
                b"No usage was billed in this period.",
            );
            self.y -= 22.0;
            self.rule(LEFT, RIGHT, self.y, 0.6, RULE);
        } else {
            self.table(&LINE_COLUMNS, &rows);
        }
        self.y -= 20.0;
    }

    fn adjustments(&mut self, view: &View<'_>) {
        if view.adjustments.is_empty() {
            return;
        }
        let rows: Vec<[Cell<'_>; 5]> = view
            .adjustments
            .iter()
            .map(|a| {
                [
                    cell(a.original_invoice_id),
                    cell(&a.period),
                    cell(a.meter),
                    cell(a.reason),
                    cell(&a.amount),
                ]
            })
            .collect();
        // The heading goes with the table's header and first row.
        let heading = 18.0;
        let first = self.row(&ADJUSTMENT_COLUMNS, &rows[0]).slots.min(3);
        if self.room(heading + HEADER_H + row_height(first)) {
            self.y -= 4.0;
        }
        self.text(
            Face::Bold,
            7.5,
            LEFT,
            self.y - 7.0,
            MUTED,
            b"ADJUSTMENTS TO EARLIER INVOICES",
        );
        self.y -= heading;
        self.table(&ADJUSTMENT_COLUMNS, &rows);
        self.y -= 20.0;
    }

    /// Subtotal, adjustments, total — kept together, right-aligned; the credit note under them.
    fn totals(&mut self, view: &View<'_>) {
        let note = view
            .credit_note
            .as_deref()
            .map(|n| wrap(Face::Regular, 8.5, &encode(n), RIGHT - SIDE_X));
        let rows = 1 + usize::from(view.adjustments_total.is_some());
        let height =
            rows as f32 * 16.0 + 30.0 + note.as_ref().map_or(0.0, |n| n.len() as f32 * 11.0 + 6.0);
        self.room(height);
        let mut y = self.y - 10.0;
        let mut row = |layout: &mut Self, label: &[u8], value: &str| {
            layout.text(Face::Regular, 9.5, SIDE_X, y, MUTED, label);
            layout.text_right(Face::Regular, 9.5, RIGHT, y, INK, &encode(value));
            y -= 16.0;
        };
        row(self, b"Subtotal", &view.subtotal);
        if let Some(adjustments) = &view.adjustments_total {
            row(self, b"Adjustments", adjustments);
        }
        let rule_y = y + 6.0;
        self.rule(SIDE_X, RIGHT, rule_y, 1.5, INK);
        y -= 10.0;
        self.text(Face::Bold, 12.0, SIDE_X, y, INK, &encode(view.total_label));
        self.text_right(Face::Bold, 12.0, RIGHT, y, INK, &encode(&view.total));
        y -= 8.0;
        for line in note.into_iter().flatten() {
            y -= 11.0;
            self.text_right(Face::Regular, 8.5, RIGHT, y, MUTED, &line);
        }
        self.y = y - 10.0;
    }

    /// The grey band with the columns' titles.
    fn table_header(&mut self, columns: &[Column]) {
        self.fill(LEFT, self.y - HEADER_H, RIGHT - LEFT, HEADER_H, BAND);
        let mut x = LEFT;
        let y = self.y - 12.0;
        for c in columns {
            let title = c.title.to_ascii_uppercase();
            if c.right {
                self.text_right(
                    Face::Bold,
                    7.5,
                    x + c.width - CELL_PAD_X,
                    y,
                    MUTED,
                    title.as_bytes(),
                );
            } else {
                self.text(Face::Bold, 7.5, x + CELL_PAD_X, y, MUTED, title.as_bytes());
            }
            x += c.width;
        }
        self.y -= HEADER_H;
    }

    fn row(&self, columns: &[Column], cells: &[Cell<'_>]) -> Row {
        let cells: Vec<_> = columns
            .iter()
            .zip(cells)
            .map(|(c, cell)| {
                let inner = c.width - 2.0 * CELL_PAD_X;
                let lines = wrap(Face::Regular, CELL_SIZE, &encode(cell.text), inner);
                Wrapped {
                    lines,
                    note: cell.note.map(encode),
                }
            })
            .collect();
        let slots = cells
            .iter()
            .map(|c| c.lines.len() + usize::from(c.note.is_some()))
            .fold(1, usize::max);
        Row { cells, slots }
    }

    /// A table: its header, then each row under a thin rule. A row that does not fit goes to a new
    /// page, which repeats the header; only a row taller than a whole page is split across pages.
    fn table(&mut self, columns: &[Column], rows: &[[Cell<'_>; 5]]) {
        let rows: Vec<Row> = rows.iter().map(|r| self.row(columns, r)).collect();
        // The slots a continued page holds under its running header and the table's header.
        let capacity =
            ((TOP - 22.0 - HEADER_H - BOTTOM - 2.0 * CELL_PAD_Y) / CELL_LEADING) as usize;
        let first = rows.first().map_or(1, |r| r.slots.min(3));
        self.room(HEADER_H + row_height(first));
        self.table_header(columns);
        for row in &rows {
            let mut from = 0;
            loop {
                let fit = ((self.y - BOTTOM - 2.0 * CELL_PAD_Y) / CELL_LEADING).max(0.0) as usize;
                let rest = row.slots - from;
                if rest <= fit {
                    self.row_slice(columns, row, from, row.slots);
                    break;
                }
                if rest > capacity && fit > 0 {
                    self.row_slice(columns, row, from, from + fit);
                    from += fit;
                }
                self.new_page();
                self.table_header(columns);
            }
        }
    }

    /// Slots `from..to` of a row, then the rule under them.
    fn row_slice(&mut self, columns: &[Column], row: &Row, from: usize, to: usize) {
        let top = self.y;
        let mut x = LEFT;
        for (c, Wrapped { lines, note }) in columns.iter().zip(&row.cells) {
            for slot in from..to {
                let y = top - CELL_PAD_Y - 8.5 - (slot - from) as f32 * CELL_LEADING;
                if let Some(line) = lines.get(slot) {
                    if c.right {
                        let right = x + c.width - CELL_PAD_X;
                        self.text_right(Face::Regular, CELL_SIZE, right, y, INK, line);
                    } else {
                        self.text(Face::Regular, CELL_SIZE, x + CELL_PAD_X, y, INK, line);
                    }
                } else if let Some(note) = note.as_ref().filter(|_| slot == lines.len()) {
                    let y = y + 3.0;
                    self.text(Face::Regular, NOTE_SIZE, x + CELL_PAD_X, y, MUTED, note);
                }
            }
            x += c.width;
        }
        self.y -= row_height(to - from);
        self.rule(LEFT, RIGHT, self.y, 0.6, RULE);
    }
}

fn show(page: &mut Content, face: Face, size: f32, x: f32, y: f32, color: Rgb, text: &[u8]) {
    let font = match face {
        Face::Regular => REGULAR,
        Face::Bold => BOLD,
    };
    page.set_fill_rgb(color.0, color.1, color.2)
        .begin_text()
        .set_font(font, size)
        .next_line(x, y)
        .show(Str(text))
        .end_text();
}

/// A large light-red VOID across the page, drawn first so that the content stays readable over it.
fn watermark(page: &mut Content) {
    let size = 150.0;
    let (sin, cos) = 35f32.to_radians().sin_cos();
    let w = width(Face::Bold, size, b"VOID");
    // Centre the word (half its width, half its cap height) on the middle of the page.
    let (u, v) = (w / 2.0, 0.718 * size / 2.0);
    let x = PAGE_W / 2.0 - u * cos + v * sin;
    let y = PAGE_H / 2.0 - u * sin - v * cos;
    page.set_fill_rgb(WATERMARK.0, WATERMARK.1, WATERMARK.2)
        .begin_text()
        .set_font(BOLD, size)
        .set_text_matrix([cos, sin, -sin, cos, x, y])
        .show(Str(b"VOID"))
        .end_text();
}

fn footer_of(page: &mut Content, footer: &[u8], number: usize, count: usize) {
    page.set_stroke_rgb(RULE.0, RULE.1, RULE.2)
        .set_line_width(0.6)
        .move_to(LEFT, 52.0)
        .line_to(RIGHT, 52.0)
        .stroke();
    show(page, Face::Regular, 8.0, LEFT, 38.0, MUTED, footer);
    let label = format!("Page {number} of {count}");
    let x = RIGHT - width(Face::Regular, 8.0, label.as_bytes());
    show(page, Face::Regular, 8.0, x, 38.0, MUTED, label.as_bytes());
}

/// The PDF objects: catalog, page tree, the two fonts, the info dictionary, then each page and its
/// content stream.
fn write(pages: Vec<Content>, title: &str) -> Vec<u8> {
    let catalog = Ref::new(1);
    let tree = Ref::new(2);
    let regular = Ref::new(3);
    let bold = Ref::new(4);
    let info = Ref::new(5);
    let page_ref = |i: usize| Ref::new(6 + 2 * i as i32);

    let mut pdf = Pdf::new();
    pdf.catalog(catalog).pages(tree).lang(TextStr("en"));
    pdf.pages(tree)
        .kids((0..pages.len()).map(page_ref))
        .count(pages.len() as i32);
    for (face, id) in [(&b"Helvetica"[..], regular), (b"Helvetica-Bold", bold)] {
        pdf.type1_font(id)
            .base_font(Name(face))
            .encoding_predefined(Name(b"WinAnsiEncoding"));
    }
    pdf.document_info(info)
        .title(TextStr(title))
        .creator(TextStr(SELLER))
        .producer(TextStr(SELLER));
    for (i, content) in pages.into_iter().enumerate() {
        let id = page_ref(i);
        let content_id = Ref::new(id.get() + 1);
        let mut page = pdf.page(id);
        page.media_box(Rect::new(0.0, 0.0, PAGE_W, PAGE_H))
            .parent(tree)
            .contents(content_id);
        page.resources()
            .fonts()
            .pair(REGULAR, regular)
            .pair(BOLD, bold);
        page.finish();
        pdf.stream(content_id, &content.finish());
    }
    pdf.finish()
}
