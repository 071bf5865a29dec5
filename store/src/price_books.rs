//! Price books in Postgres (SPEC §5): create and edit them, each change audited in the transaction that
//! makes it, and load them for the pipeline.
//!
//! ```text
//!  create ─► BEGIN ─ lock the meter's books ─ INSERT price_books (its trigger writes
//!                       price_book_selectors, where 23P01 price_books_no_overlap: another book or
//!                       entry of the meter, scope and selector overlaps ─► Overlap, rolled back)
//!                  ─ INSERT price_book_audit ('create', null, after) ─ COMMIT
//!  edit   ─► BEGIN ─ SELECT … FOR UPDATE ─ lock the meter's books ─ edit(before)
//!                  ─ UPDATE (23P01 price_books_no_overlap ─► Overlap)
//!                  ─ INSERT price_book_audit ('update', before, after) ─ COMMIT
//!  load_price_books ─► every book as plain meterflow_model::PriceBooks, a rate card as one per entry
//!                      (the pipeline's rating input)
//! ```
//! Concurrent writers of one meter's books take turns on a transaction lock (`lock_meter`), and the
//! exclusion constraint (migration 0022) decides each against the books committed before it, so of
//! overlapping creations exactly one wins. Without the turns, two writers could deadlock in the
//! constraint's check and one would fail with 40P01 (the API's 503). Edits that still meet a deadlock
//! or a serialization failure are retried.

use chrono::{DateTime, SecondsFormat, Utc};
use meterflow_model::{Dimensions, FieldError, PriceBook, PriceModel, RateEntry};
use rust_decimal::Decimal;
use sqlx::types::Json;
use sqlx::{Connection, PgConnection};

/// The exclusion constraint that keeps the books of one meter, customer scope and dimension selector
/// from overlapping.
pub const OVERLAP_CONSTRAINT: &str = "price_books_no_overlap";

/// A book as stored, with when it was created and last changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredPriceBook {
    pub book: PriceBook,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Why a book could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PriceBookError {
    /// Another book of the same meter and customer scope is in force during part of the range.
    #[error("the range overlaps another price book of the same meter and customer scope")]
    Overlap {
        /// The book it overlaps, when it could be found.
        with: Option<String>,
    },
    #[error("no price book has this id")]
    NotFound,
    /// The edit is not a valid change of the stored book.
    #[error("the change is invalid")]
    Invalid(Vec<FieldError>),
    #[error("postgres refused the change: {0}")]
    Database(#[from] sqlx::Error),
}

/// A `price_books` row as the queries select it (every query names these columns, checked by sqlx):
/// the range's bounds as times, the model as JSON.
struct PriceBookRow {
    price_book_id: String,
    meter: String,
    customer_id: Option<String>,
    currency: String,
    effective_from: DateTime<Utc>,
    effective_to: Option<DateTime<Utc>>,
    model: Json<PriceModel>,
    minimum_per_period: Option<Decimal>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    dimensions: Json<Dimensions>,
    entries: Option<Json<Vec<RateEntry>>>,
}

impl From<PriceBookRow> for StoredPriceBook {
    fn from(row: PriceBookRow) -> Self {
        let Json(model) = row.model;
        StoredPriceBook {
            book: PriceBook {
                entries: row.entries.map(|Json(e)| e).unwrap_or_default(),
                price_book_id: row.price_book_id,
                meter: row.meter,
                customer_id: row.customer_id,
                dimensions: row.dimensions.0,
                currency: row.currency,
                effective_from: row.effective_from.timestamp_micros(),
                effective_to: row.effective_to.map(|t| t.timestamp_micros()),
                model,
                minimum_per_period: row.minimum_per_period,
            },
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

/// Every price book, for rating: plain books, a rate card as one book per entry
/// ([`PriceBook::priced`]).
pub async fn load_price_books(conn: &mut PgConnection) -> Result<Vec<PriceBook>, sqlx::Error> {
    let rows = sqlx::query_as!(
        PriceBookRow,
        r#"SELECT price_book_id, meter, customer_id, currency, lower(effective) AS "effective_from!",
                upper(effective) AS "effective_to?", model AS "model: Json<PriceModel>",
                minimum_per_period, created_at, updated_at,
                dimensions AS "dimensions: Json<Dimensions>",
                entries AS "entries: Json<Vec<RateEntry>>"
         FROM price_books ORDER BY meter, scope, lower(effective)"#
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .flat_map(|r| StoredPriceBook::from(r).book.priced())
        .collect())
}

/// One book by id.
pub async fn get_price_book(
    conn: &mut PgConnection,
    price_book_id: &str,
) -> Result<Option<StoredPriceBook>, sqlx::Error> {
    let row = sqlx::query_as!(
        PriceBookRow,
        r#"SELECT price_book_id, meter, customer_id, currency, lower(effective) AS "effective_from!",
                upper(effective) AS "effective_to?", model AS "model: Json<PriceModel>",
                minimum_per_period, created_at, updated_at,
                dimensions AS "dimensions: Json<Dimensions>",
                entries AS "entries: Json<Vec<RateEntry>>"
         FROM price_books WHERE price_book_id = $1"#,
        price_book_id,
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(StoredPriceBook::from))
}

/// Which books a list shows, and where a page starts.
#[derive(Clone, Debug, Default)]
pub struct BookFilter<'a> {
    pub meter: Option<&'a str>,
    pub customer_id: Option<&'a str>,
    /// Only the default books (no customer) and this customer's: what a key bound to it may see.
    pub visible_to: Option<&'a str>,
    /// Books in force at some instant of `[from, to)` (either end open when `None`).
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// The (meter, effective_from, price_book_id) of the last book of the previous page.
    pub after: Option<(&'a str, DateTime<Utc>, &'a str)>,
    pub limit: i64,
}

/// Books in (meter, effective_from, price_book_id) order.
pub async fn list_price_books(
    conn: &mut PgConnection,
    filter: &BookFilter<'_>,
) -> Result<Vec<StoredPriceBook>, sqlx::Error> {
    let (after_meter, after_from, after_id) = match filter.after {
        Some((m, f, id)) => (Some(m), Some(f), Some(id)),
        None => (None, None, None),
    };
    let rows = sqlx::query_as!(
        PriceBookRow,
        r#"SELECT price_book_id, meter, customer_id, currency, lower(effective) AS "effective_from!",
                upper(effective) AS "effective_to?", model AS "model: Json<PriceModel>",
                minimum_per_period, created_at, updated_at,
                dimensions AS "dimensions: Json<Dimensions>",
                entries AS "entries: Json<Vec<RateEntry>>"
         FROM price_books
         WHERE ($1::text IS NULL OR meter = $1)
           AND ($2::text IS NULL OR customer_id = $2)
           AND effective && tstzrange($3, $4, '[)')
           AND ($5::text IS NULL OR (meter, lower(effective), price_book_id) > ($5, $6, $7))
           AND ($9::text IS NULL OR customer_id IS NULL OR customer_id = $9)
         ORDER BY meter, lower(effective), price_book_id
         LIMIT $8"#,
        filter.meter,
        filter.customer_id,
        filter.from,
        filter.to,
        after_meter,
        after_from,
        after_id,
        filter.limit,
        filter.visible_to,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(StoredPriceBook::from).collect())
}

/// Stores a new book and its audit row, unless it overlaps another book of its meter and scope.
pub async fn create_price_book(
    conn: &mut PgConnection,
    book: &PriceBook,
) -> Result<StoredPriceBook, PriceBookError> {
    let mut tx = conn.begin().await?;
    lock_meter(&mut tx, &book.meter).await?;
    let inserted = sqlx::query!(
        r#"INSERT INTO price_books
             (price_book_id, meter, customer_id, currency, effective, model, minimum_per_period,
              dimensions, entries)
         VALUES ($1, $2, $3, $4, tstzrange($5, $6, '[)'), $7, $8, $9::text::jsonb, $10)
         RETURNING created_at AS "created_at!", updated_at AS "updated_at!""#,
        book.price_book_id,
        book.meter,
        book.customer_id,
        book.currency,
        instant(book.effective_from)?,
        book.effective_to.map(instant).transpose()?,
        Json(&book.model) as _,
        book.minimum_per_period,
        book.dimensions.to_string(),
        book.is_card().then_some(Json(&book.entries)) as _,
    )
    .fetch_one(&mut *tx)
    .await;
    let row = match inserted {
        Ok(row) => row,
        Err(e) if is_overlap(&e) => {
            drop(tx);
            let with = overlapping(conn, book).await?;
            return Err(PriceBookError::Overlap { with });
        }
        Err(e) => return Err(e.into()),
    };
    audit(&mut tx, &book.price_book_id, "create", None, book).await?;
    tx.commit().await?;
    Ok(StoredPriceBook {
        book: book.clone(),
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

/// Changes a book's `model`, `minimum_per_period`, `effective_to` and a card's `entries` to those of
/// `edit(stored)` (the rest
/// of what `edit` returns is ignored), with an audit row. An edit that changes nothing writes nothing.
/// `edit` may be called again if the transaction has to be retried.
pub async fn update_price_book(
    conn: &mut PgConnection,
    price_book_id: &str,
    edit: impl Fn(&PriceBook) -> Result<PriceBook, Vec<FieldError>>,
) -> Result<StoredPriceBook, PriceBookError> {
    const ATTEMPTS: usize = 3;
    let mut attempt = 1;
    loop {
        match try_update(conn, price_book_id, &edit).await {
            Err(PriceBookError::Database(e)) if is_overlap(&e) => {
                // The failed transaction is gone; find the other book on a fresh one.
                let book = get_price_book(conn, price_book_id).await?;
                let with = match book {
                    Some(b) => edit(&b.book).ok(),
                    None => None,
                };
                let with = match with {
                    Some(after) => overlapping(conn, &after).await?,
                    None => None,
                };
                return Err(PriceBookError::Overlap { with });
            }
            Err(PriceBookError::Database(e)) if attempt < ATTEMPTS && is_retryable(&e) => {
                attempt += 1;
            }
            other => return other,
        }
    }
}

async fn try_update(
    conn: &mut PgConnection,
    price_book_id: &str,
    edit: &impl Fn(&PriceBook) -> Result<PriceBook, Vec<FieldError>>,
) -> Result<StoredPriceBook, PriceBookError> {
    let mut tx = conn.begin().await?;
    let before: StoredPriceBook = sqlx::query_as!(
        PriceBookRow,
        r#"SELECT price_book_id, meter, customer_id, currency, lower(effective) AS "effective_from!",
                upper(effective) AS "effective_to?", model AS "model: Json<PriceModel>",
                minimum_per_period, created_at, updated_at,
                dimensions AS "dimensions: Json<Dimensions>",
                entries AS "entries: Json<Vec<RateEntry>>"
         FROM price_books WHERE price_book_id = $1 FOR UPDATE"#,
        price_book_id,
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(PriceBookError::NotFound)?
    .into();
    lock_meter(&mut tx, &before.book.meter).await?;
    let edited = edit(&before.book).map_err(PriceBookError::Invalid)?;
    let after = PriceBook {
        model: edited.model,
        minimum_per_period: edited.minimum_per_period,
        effective_to: edited.effective_to,
        entries: edited.entries,
        ..before.book.clone()
    };
    if after == before.book {
        return Ok(before);
    }
    let updated_at = sqlx::query_scalar!(
        "UPDATE price_books
         SET model = $2, minimum_per_period = $3, effective = tstzrange(lower(effective), $4, '[)'),
             entries = $5, updated_at = now()
         WHERE price_book_id = $1
         RETURNING updated_at",
        price_book_id,
        Json(&after.model) as _,
        after.minimum_per_period,
        after.effective_to.map(instant).transpose()?,
        after.is_card().then_some(Json(&after.entries)) as _,
    )
    .fetch_one(&mut *tx)
    .await?;
    audit(&mut tx, price_book_id, "update", Some(&before.book), &after).await?;
    tx.commit().await?;
    Ok(StoredPriceBook {
        book: after,
        created_at: before.created_at,
        updated_at,
    })
}

/// Takes the transaction's lock on `meter`'s books: their writers go one at a time.
///
/// Without it, two writers of overlapping books could each insert their selector rows and then each
/// wait on the other's in the exclusion check, a deadlock that Postgres breaks by failing one of them
/// (40P01; migration 0022's selector order does not prevent it for one shared selector). The lock comes
/// after an update's row lock and holds no row the next writer waits on, so it adds no cycle of its own.
async fn lock_meter(conn: &mut PgConnection, meter: &str) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "SELECT pg_advisory_xact_lock(hashtext('meterflow.price_books'), hashtext($1))",
        meter
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Another book of `book`'s meter and scope, holding one of its selectors, whose range meets `book`'s.
async fn overlapping(
    conn: &mut PgConnection,
    book: &PriceBook,
) -> Result<Option<String>, sqlx::Error> {
    let selectors: Vec<String> = book.selectors().iter().map(|d| d.to_string()).collect();
    sqlx::query_scalar!(
        "SELECT price_book_id FROM price_book_selectors
         WHERE meter = $1 AND scope = coalesce($2, '') AND price_book_id <> $3
           AND effective && tstzrange($4, $5, '[)')
           AND selector IN (SELECT s::jsonb::text FROM UNNEST($6::text[]) AS s)
         ORDER BY lower(effective) LIMIT 1",
        book.meter,
        book.customer_id,
        book.price_book_id,
        instant(book.effective_from)?,
        book.effective_to.map(instant).transpose()?,
        &selectors,
    )
    .fetch_optional(&mut *conn)
    .await
}

async fn audit(
    conn: &mut PgConnection,
    price_book_id: &str,
    action: &str,
    before: Option<&PriceBook>,
    after: &PriceBook,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "INSERT INTO price_book_audit (price_book_id, action, before, after) VALUES ($1, $2, $3, $4)",
        price_book_id,
        action,
        before.map(audit_record),
        audit_record(after),
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A book as the audit keeps it: RFC 3339 times, decimals as strings with their digits.
fn audit_record(book: &PriceBook) -> serde_json::Value {
    let time = |micros: i64| {
        DateTime::from_timestamp_micros(micros)
            .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    };
    let mut record = serde_json::json!({
        "price_book_id": book.price_book_id,
        "meter": book.meter,
        "customer_id": book.customer_id,
        "dimensions": book.dimensions,
        "currency": book.currency,
        "effective_from": time(book.effective_from),
        "effective_to": book.effective_to.and_then(time),
        "model": book.model,
        "minimum_per_period": book.minimum_per_period,
    });
    // A rate card's prices are its entries (its `model` is only the first entry's).
    if let (true, Some(fields)) = (book.is_card(), record.as_object_mut()) {
        fields.remove("model");
        fields.insert("entries".into(), serde_json::json!(book.entries));
    }
    record
}

/// Did the exclusion constraint refuse the change (SQLSTATE 23P01 on `price_books_no_overlap`)?
pub fn is_overlap(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|db| {
        db.code().as_deref() == Some("23P01") && db.constraint() == Some(OVERLAP_CONSTRAINT)
    })
}

/// A deadlock (40P01) or serialization failure (40001): the transaction may simply be run again.
fn is_retryable(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|c| c == "40P01" || c == "40001")
}

fn instant(micros: i64) -> Result<DateTime<Utc>, sqlx::Error> {
    DateTime::from_timestamp_micros(micros).ok_or_else(|| {
        sqlx::Error::Encode(format!("{micros} µs is outside the representable range").into())
    })
}
