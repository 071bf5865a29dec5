//! A made-up customer and a typical invoice for examples, benchmarks and tests: `invoice(10, 2, "USD")`
//! has ten usage lines (one of them a minimum top-up) and two adjustments of earlier invoices, its
//! totals computed as SPEC §6 says (lines rounded once; total = subtotal + Σ adjustments).

use meterflow_model::money::round_to_minor_unit;
use meterflow_model::{Adjustment, Customer, Invoice, InvoiceLine, InvoiceStatus, LineKind};
use rust_decimal::Decimal;

/// 2024-01-01T00:00:00Z and 2024-02-01T00:00:00Z.
const JANUARY: i64 = 1_704_067_200;
const FEBRUARY: i64 = 1_706_745_600;
const DECEMBER: i64 = 1_701_388_800;

pub fn customer() -> Customer {
    Customer {
        customer_id: "cust_00042".to_owned(),
        name: "Nordlicht Analytics GmbH".to_owned(),
        email: Some("billing@nordlicht.example".to_owned()),
        address: Some("Friedrichstraße 123\n10117 Berlin\nGermany".to_owned()),
        currency: "USD".to_owned(),
    }
}

/// One meter of the sample: how its line reads and prices.
struct SampleMeter {
    meter: &'static str,
    description: &'static str,
    unit_price_summary: &'static str,
    /// (mantissa, scale) of the unit price.
    unit_price: (i64, u32),
    /// About the quantity a month of it has.
    typical: i64,
}

const METERS: [SampleMeter; 6] = [
    SampleMeter {
        meter: "api_calls",
        description: "API calls",
        unit_price_summary: "graduated: 0.01 up to 1,000, then 0.005",
        unit_price: (5, 3),
        typical: 1_254_300,
    },
    SampleMeter {
        meter: "tokens",
        description: "LLM tokens (input and output)",
        unit_price_summary: "per unit: 0.000002",
        unit_price: (2, 6),
        typical: 48_210_775,
    },
    SampleMeter {
        meter: "storage_gb",
        description: "Storage, GB-months (maximum)",
        unit_price_summary: "per unit: 0.023",
        unit_price: (23, 3),
        typical: 1_234,
    },
    SampleMeter {
        meter: "compute_seconds",
        description: "Compute time, seconds",
        unit_price_summary: "volume: 0.00012 from 0",
        unit_price: (12, 5),
        typical: 861_400,
    },
    SampleMeter {
        meter: "seats",
        description: "Active seats (latest)",
        unit_price_summary: "per unit: 12.00",
        unit_price: (1200, 2),
        typical: 42,
    },
    SampleMeter {
        meter: "egress_gb",
        description: "Network egress, GB",
        unit_price_summary: "package: 0.90 per 10 GB",
        unit_price: (9, 2),
        typical: 3_120,
    },
];

/// An issued invoice for January 2024 in `currency` with `lines` lines (the fourth a minimum top-up)
/// and `adjustments` corrections of December 2023's invoice.
pub fn invoice(lines: usize, adjustments: usize, currency: &str) -> Invoice {
    let line_items: Vec<InvoiceLine> = (0..lines)
        .map(|i| {
            let SampleMeter {
                meter,
                description,
                unit_price_summary: summary,
                unit_price: (mantissa, scale),
                typical,
            } = METERS[i % METERS.len()];
            let round = i / METERS.len();
            let meter = if round == 0 {
                meter.to_owned()
            } else {
                format!("{meter}_{round}")
            };
            // The typical quantity, give or take a fifth; storage has three decimals.
            let spread = typical / 5 * ((i as i64 * 7_919) % 200 - 100) / 100;
            let quantity = Decimal::new(typical + spread, 0)
                + if meter == "storage_gb" {
                    Decimal::new((i as i64 * 379) % 1000, 3)
                } else {
                    Decimal::ZERO
                };
            let minimum = i == 3;
            let amount = if minimum {
                Decimal::new(2_500, 2)
            } else {
                quantity * Decimal::new(mantissa, scale)
            };
            InvoiceLine {
                dimensions: Default::default(),
                meter,
                kind: if minimum {
                    LineKind::Minimum
                } else {
                    LineKind::Usage
                },
                description: if minimum {
                    "Top-up to the monthly minimum".to_owned()
                } else {
                    description.to_owned()
                },
                quantity: if minimum { Decimal::ONE } else { quantity },
                unit_price_summary: if minimum {
                    "minimum per period: 25.00".to_owned()
                } else {
                    summary.to_owned()
                },
                amount: round_to_minor_unit(amount, currency),
                price_book_id: format!("pb_{:04}", 17 + i % METERS.len()),
            }
        })
        .collect();
    let adjustments: Vec<Adjustment> = (0..adjustments)
        .map(|i| Adjustment {
            dimensions: Default::default(),
            original_invoice_id: format!("7f3c2a9e-41b0-4c55-9d2e-0a6b1c{:06}", 100 + i),
            period_start: DECEMBER,
            meter: METERS[i % METERS.len()].meter.to_owned(),
            price_book_id: format!("pb_{:04}", 17 + i % METERS.len()),
            amount: round_to_minor_unit(
                if i % 2 == 0 {
                    Decimal::new(12_345, 2)
                } else {
                    Decimal::new(-3_075, 2)
                },
                currency,
            ),
            reason: if i % 2 == 0 {
                "Late usage after the invoice was issued".to_owned()
            } else {
                "Price book edited: unit price lowered".to_owned()
            },
        })
        .collect();
    let subtotal = line_items.iter().map(|l| l.amount).sum::<Decimal>();
    let total = subtotal + adjustments.iter().map(|a| a.amount).sum::<Decimal>();
    Invoice {
        invoice_id: "c1a5e0d4-93f2-4b7a-8e61-5f2d0c9b7a31".to_owned(),
        number: 1042,
        customer_id: customer().customer_id,
        billing_period_start: JANUARY,
        billing_period_end: FEBRUARY,
        status: InvoiceStatus::Issued,
        currency: currency.to_owned(),
        line_items,
        adjustments,
        subtotal,
        total,
        // 2024-02-01T00:05:00Z.
        issued_at: (FEBRUARY + 300) * 1_000_000,
    }
}
