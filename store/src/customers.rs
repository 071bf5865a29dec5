//! Customers in Postgres (SPEC §6): registered, read, listed and edited. A customer is billed in one
//! currency: it can change only while the customer has no issued invoice.

use chrono::{DateTime, Utc};
use meterflow_model::Customer;
use sqlx::{Connection, PgConnection};

/// A customer as stored, with when it was registered and last changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCustomer {
    pub customer: Customer,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum CustomerError {
    #[error("a customer with id {0} is already registered")]
    AlreadyExists(String),
    #[error("no customer has this id")]
    NotFound,
    /// The currency of a customer with issued invoices cannot change.
    #[error(
        "the customer has issued invoices in {0}; a customer is billed in one currency (void its invoices \
         first, or register a new customer)"
    )]
    CurrencyLocked(String),
    #[error("postgres refused the change: {0}")]
    Database(#[from] sqlx::Error),
}

/// A `customers` row as the queries select it (every query names these columns, checked by sqlx).
struct CustomerRow {
    customer_id: String,
    name: String,
    email: Option<String>,
    address: Option<String>,
    currency: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<CustomerRow> for StoredCustomer {
    fn from(row: CustomerRow) -> Self {
        StoredCustomer {
            customer: Customer {
                customer_id: row.customer_id,
                name: row.name,
                email: row.email,
                address: row.address,
                currency: row.currency,
            },
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

/// Registers a customer; a taken id is [`CustomerError::AlreadyExists`].
pub async fn create_customer(
    conn: &mut PgConnection,
    customer: &Customer,
) -> Result<StoredCustomer, CustomerError> {
    let row = sqlx::query_as!(
        CustomerRow,
        "INSERT INTO customers (customer_id, name, email, address, currency)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT ON CONSTRAINT customers_pkey DO NOTHING
         RETURNING customer_id, name, email, address, currency, created_at, updated_at",
        customer.customer_id,
        customer.name,
        customer.email,
        customer.address,
        customer.currency,
    )
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(row) => Ok(row.into()),
        None => Err(CustomerError::AlreadyExists(customer.customer_id.clone())),
    }
}

pub async fn get_customer(
    conn: &mut PgConnection,
    customer_id: &str,
) -> Result<Option<StoredCustomer>, sqlx::Error> {
    let row = sqlx::query_as!(
        CustomerRow,
        "SELECT customer_id, name, email, address, currency, created_at, updated_at
         FROM customers WHERE customer_id = $1",
        customer_id,
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(StoredCustomer::from))
}

/// Customers in id order after `after`, at most `limit`.
pub async fn list_customers(
    conn: &mut PgConnection,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<StoredCustomer>, sqlx::Error> {
    let rows = sqlx::query_as!(
        CustomerRow,
        "SELECT customer_id, name, email, address, currency, created_at, updated_at
         FROM customers
         WHERE ($1::text IS NULL OR customer_id > $1)
         ORDER BY customer_id LIMIT $2",
        after,
        limit,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(StoredCustomer::from).collect())
}

/// Replaces a customer's name, email, address and currency with those of `edit(stored)`; the id stays.
/// The row is locked meanwhile, as issuing locks it, so a currency change and an issue never interleave.
pub async fn update_customer(
    conn: &mut PgConnection,
    customer_id: &str,
    edit: impl FnOnce(&Customer) -> Customer,
) -> Result<StoredCustomer, CustomerError> {
    let mut tx = conn.begin().await?;
    let before: StoredCustomer = sqlx::query_as!(
        CustomerRow,
        "SELECT customer_id, name, email, address, currency, created_at, updated_at
         FROM customers WHERE customer_id = $1 FOR UPDATE",
        customer_id,
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(CustomerError::NotFound)?
    .into();
    let after = edit(&before.customer);
    if after.currency != before.customer.currency {
        let issued = sqlx::query_scalar!(
            "SELECT currency FROM invoices WHERE customer_id = $1 AND status = 'issued' LIMIT 1",
            customer_id,
        )
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(currency) = issued {
            return Err(CustomerError::CurrencyLocked(currency));
        }
    }
    let row = sqlx::query_as!(
        CustomerRow,
        "UPDATE customers SET name = $2, email = $3, address = $4, currency = $5, updated_at = now()
         WHERE customer_id = $1
         RETURNING customer_id, name, email, address, currency, created_at, updated_at",
        customer_id,
        after.name,
        after.email,
        after.address,
        after.currency,
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(row.into())
}
