//! Property tests of the pricing math (SPEC §5) on random inputs, each checked against a plain reference
//! computed here: graduated prices against a unit-by-unit walk, package prices against integer ceiling
//! division, rounding against integer rounding of the mantissa, and `rate_period` against recomputing the
//! period-to-date quantity from scratch for every window. Every test has its own fixed seed, so a failure
//! reproduces; the failing input is in the assertion message.
//!
//! Length: fifteen property tests, each beside the plain reference it checks against; split, a test and
//! its reference would live apart.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::str::FromStr;

use meterflow_model::money::{self, minor_unit_digits, round_to_minor_unit, MoneyError};
use meterflow_model::{
    book_for, period_of, rate_period, Charge, Measure, PriceBook, PriceModel, Tier, WindowUsage,
};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;

const CASES: usize = 3_000;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// A decimal with a mantissa in `0..=max` and a scale in `0..=max_scale`.
fn decimal(rng: &mut SmallRng, max: i64, max_scale: u32) -> Decimal {
    Decimal::new(rng.random_range(0..=max), rng.random_range(0..=max_scale))
}

fn unit_price(rng: &mut SmallRng) -> Decimal {
    decimal(rng, 100_000, 5)
}

/// Zero half the time: most tiers have no flat fee.
fn flat_fee(rng: &mut SmallRng) -> Decimal {
    if rng.random_bool(0.5) {
        Decimal::ZERO
    } else {
        decimal(rng, 10_000, 2)
    }
}

/// One to six tiers, the last open; each bound is 1..=300 units above the previous one, in whole units
/// when `whole`, else with up to three decimals.
fn tiers(rng: &mut SmallRng, whole: bool) -> Vec<Tier> {
    let n = rng.random_range(1..=6);
    let mut bound = Decimal::ZERO;
    let tiers: Vec<Tier> = (0..n)
        .map(|i| {
            let up_to = (i + 1 < n).then(|| {
                bound += if whole {
                    Decimal::from(rng.random_range(1..=300))
                } else {
                    Decimal::new(rng.random_range(1..=300_000), 3)
                };
                bound
            });
            Tier {
                up_to,
                unit_price: unit_price(rng),
                flat_fee: flat_fee(rng),
            }
        })
        .collect();
    assert!(
        PriceModel::Graduated {
            tiers: tiers.clone()
        }
        .validate()
        .is_empty(),
        "generated tiers must be valid: {tiers:?}"
    );
    tiers
}

/// The tiers' bounds, and a quantity that is often exactly one of them, sometimes zero, else anywhere up
/// to 400 units past the last bound (three decimals).
fn quantity_near(rng: &mut SmallRng, tiers: &[Tier]) -> Decimal {
    let bounds: Vec<Decimal> = tiers.iter().filter_map(|t| t.up_to).collect();
    let last = bounds.last().copied().unwrap_or_default();
    match rng.random_range(0..8) {
        0 if !bounds.is_empty() => bounds[rng.random_range(0..bounds.len())],
        1 => Decimal::ZERO,
        _ => Decimal::new(
            rng.random_range(0..=(i64::try_from(last.trunc()).unwrap() + 400) * 1000),
            3,
        ),
    }
}

/// The graduated price of `quantity` whole units, walking them one by one: each unit is priced in the
/// tier it falls in, and a tier's flat fee is added when its first unit is reached.
fn graduated_unit_by_unit(tiers: &[Tier], quantity: u64) -> Decimal {
    let mut total = Decimal::ZERO;
    let mut entered = None;
    for unit in 1..=quantity {
        let unit = Decimal::from(unit);
        let i = tiers
            .iter()
            .position(|t| t.up_to.is_none_or(|up| unit <= up))
            .unwrap();
        total += tiers[i].unit_price;
        if entered != Some(i) {
            total += tiers[i].flat_fee;
            entered = Some(i);
        }
    }
    total
}

#[test]
fn a_graduated_price_is_the_sum_of_its_units_each_priced_in_its_tier() {
    let mut rng = SmallRng::seed_from_u64(1);
    for _ in 0..CASES {
        let tiers = tiers(&mut rng, true);
        let last: u64 = tiers
            .iter()
            .filter_map(|t| t.up_to)
            .next_back()
            .map_or(0, |b| b.try_into().unwrap());
        let quantity = rng.random_range(0..=last + 200);
        let model = PriceModel::Graduated {
            tiers: tiers.clone(),
        };
        let expected = graduated_unit_by_unit(&tiers, quantity);
        let q = Decimal::from(quantity);
        assert_eq!(model.price(q), Ok(expected), "price({q}) of {tiers:?}");
        assert_eq!(
            model.marginal(Decimal::ZERO, q),
            Ok(expected),
            "marginal(0, {q}) of {tiers:?}"
        );
    }
}

/// A random valid per-unit, graduated or package model with fractional tier bounds.
fn monotone_model(rng: &mut SmallRng) -> PriceModel {
    match rng.random_range(0..3) {
        0 => PriceModel::PerUnit {
            unit_price: unit_price(rng),
        },
        1 => PriceModel::Graduated {
            tiers: tiers(rng, false),
        },
        _ => PriceModel::Package {
            package_size: Decimal::new(rng.random_range(1..=100_000), rng.random_range(0..=3)),
            package_price: unit_price(rng),
        },
    }
}

#[test]
fn per_unit_graduated_and_package_prices_never_fall_as_the_quantity_grows() {
    let mut rng = SmallRng::seed_from_u64(2);
    for _ in 0..CASES {
        let model = monotone_model(&mut rng);
        let tiers = match &model {
            PriceModel::Graduated { tiers } => tiers.clone(),
            _ => Vec::new(),
        };
        let mut low = quantity_near(&mut rng, &tiers);
        if rng.random_bool(0.1) {
            low = -low;
        }
        // Just past `low` (a tier bound, where a flat fee starts) as often as well past it.
        let step = if rng.random_bool(0.5) {
            Decimal::new(1, 3)
        } else {
            decimal(&mut rng, 1_000_000, 3)
        };
        let high = low + step;
        let (p_low, p_high) = (model.price(low).unwrap(), model.price(high).unwrap());
        assert!(
            p_low <= p_high,
            "price({low}) = {p_low} > price({high}) = {p_high} for {model:?}"
        );
        assert!(
            p_low >= Decimal::ZERO,
            "negative price({low}) for {model:?}"
        );
    }
}

#[test]
fn volume_prices_the_whole_quantity_at_the_one_tier_it_falls_in() {
    let mut rng = SmallRng::seed_from_u64(3);
    for _ in 0..CASES {
        let tiers = tiers(&mut rng, false);
        let model = PriceModel::Volume {
            tiers: tiers.clone(),
        };
        let q = quantity_near(&mut rng, &tiers);
        // The tier whose half-open range (previous bound, up_to] holds q.
        let mut lower = Decimal::ZERO;
        let mut tier = None;
        for t in &tiers {
            if lower < q && t.up_to.is_none_or(|up| q <= up) {
                tier = Some(t);
            }
            lower = t.up_to.unwrap_or(lower);
        }
        let expected = tier.map_or(Decimal::ZERO, |t| q * t.unit_price + t.flat_fee);
        assert_eq!(model.price(q), Ok(expected), "price({q}) of {tiers:?}");
    }
    // And so volume prices are not monotone: one unit more can cost less.
    let model = PriceModel::Volume {
        tiers: vec![
            Tier {
                up_to: Some(d("10")),
                unit_price: d("1"),
                flat_fee: d("0"),
            },
            Tier {
                up_to: None,
                unit_price: d("0.5"),
                flat_fee: d("0"),
            },
        ],
    };
    assert!(model.price(d("11")).unwrap() < model.price(d("10")).unwrap());
}

#[test]
fn a_graduated_price_of_a_sum_is_the_price_of_one_part_plus_the_marginal_price_of_the_other() {
    let mut rng = SmallRng::seed_from_u64(4);
    for _ in 0..CASES {
        let whole = rng.random_bool(0.3);
        let tiers = tiers(&mut rng, whole);
        let model = PriceModel::Graduated {
            tiers: tiers.clone(),
        };
        let q1 = quantity_near(&mut rng, &tiers);
        let q2 = quantity_near(&mut rng, &tiers);
        let whole = model.price(q1 + q2).unwrap();
        let split = model.price(q1).unwrap() + model.marginal(q1, q2).unwrap();
        assert_eq!(whole, split, "price({q1} + {q2}) of {tiers:?}");

        // What rating does: a quantity arriving in parts, each priced by its marginal, costs its price.
        let mut ptd = Decimal::ZERO;
        let mut charged = Decimal::ZERO;
        for _ in 0..rng.random_range(1..=8) {
            let part = quantity_near(&mut rng, &tiers) / Decimal::from(4);
            charged += model.marginal(ptd, part).unwrap();
            ptd += part;
        }
        assert_eq!(
            charged,
            model.price(ptd).unwrap(),
            "parts summing to {ptd} of {tiers:?}"
        );
    }
}

/// `ceil(a / b)` for `a = a_mantissa / 10^a_scale` and `b = b_mantissa / 10^b_scale`, in integers.
fn ceil_div(a: &Decimal, b: &Decimal) -> u128 {
    let (a_m, b_m) = (a.mantissa() as u128, b.mantissa() as u128);
    let numerator = a_m * 10u128.pow(b.scale());
    let denominator = b_m * 10u128.pow(a.scale());
    numerator.div_ceil(denominator)
}

#[test]
fn packages_round_up_to_whole_packages() {
    let mut rng = SmallRng::seed_from_u64(5);
    for _ in 0..CASES {
        let size = Decimal::new(rng.random_range(1..=1_000_000), rng.random_range(0..=3));
        let package_price = unit_price(&mut rng);
        let model = PriceModel::Package {
            package_size: size,
            package_price,
        };
        let q = decimal(&mut rng, 1_000_000_000_000, 9);
        let packages = Decimal::from(ceil_div(&q, &size));
        assert_eq!(
            model.price(q),
            Ok(packages * package_price),
            "price({q}) in packages of {size}"
        );

        let k = Decimal::from(rng.random_range(1..=1_000));
        let exact = k * size;
        assert_eq!(
            model.price(exact),
            Ok(k * model.price(size).unwrap()),
            "price({k} × {size})"
        );
        let just_over = exact + Decimal::new(1, 9);
        assert_eq!(
            model.price(just_over),
            Ok((k + Decimal::ONE) * package_price),
            "price({just_over}) in packages of {size}"
        );
    }
}

/// A package count one short when the quantity exceeds a whole number of packages by less than
/// `Decimal`'s division keeps (28 significant digits): 6.0000000000000000000000000001 / 3 rounds to
/// exactly 2, whose ceiling is 2, not 3; `price` corrects the quotient by one package either way.
#[test]
fn a_quantity_a_hair_over_whole_packages_costs_one_package_more() {
    let model = PriceModel::Package {
        package_size: d("3"),
        package_price: d("1"),
    };
    let q = d("6.0000000000000000000000000001");
    assert_eq!(model.price(q), Ok(d("3")));
}

/// `x` rounded to `digits` decimals, half away from zero, on the integer mantissa.
fn round_reference(x: Decimal, digits: u32) -> Decimal {
    let (m, scale) = (x.mantissa(), x.scale());
    if scale <= digits {
        return x;
    }
    let unit = 10i128.pow(scale - digits);
    let (mut rounded, rest) = (m / unit, m % unit);
    if 2 * rest.abs() >= unit {
        rounded += m.signum();
    }
    Decimal::from_i128_with_scale(rounded, digits)
}

#[test]
fn rounding_to_the_minor_unit_is_half_away_from_zero_idempotent_and_symmetric() {
    assert_eq!(minor_unit_digits("USD"), 2);
    assert_eq!(minor_unit_digits("JPY"), 0);
    assert_eq!(minor_unit_digits("KWD"), 3);
    let max_mantissa = Decimal::MAX.mantissa();
    let mut rng = SmallRng::seed_from_u64(6);
    for _ in 0..CASES {
        for (currency, digits) in [("USD", 2u32), ("JPY", 0), ("KWD", 3)] {
            let scale = rng.random_range(0..=28u32);
            let magnitude = 10i128.pow(rng.random_range(1..=29)).min(max_mantissa);
            let mut m = rng.random_range(0..=magnitude);
            if scale > digits && rng.random_bool(0.25) {
                // Exactly half a minor unit over a whole number of minor units.
                let unit = 10i128.pow(scale - digits);
                m = (m / unit).min(max_mantissa / unit - 1) * unit + unit / 2;
            }
            if rng.random_bool(0.5) {
                m = -m;
            }
            let x = Decimal::from_i128_with_scale(m, scale);
            let r = round_to_minor_unit(x, currency);
            assert_eq!(r, round_reference(x, digits), "round({x}, {currency})");
            assert!(r.scale() <= digits, "round({x}, {currency}) = {r}");
            assert_eq!(
                round_to_minor_unit(r, currency),
                r,
                "round twice ({x}, {currency})"
            );
            assert_eq!(
                round_to_minor_unit(-x, currency),
                -r,
                "round(-{x}, {currency})"
            );
            assert!(
                (r - x).abs() <= Decimal::new(5, digits + 1),
                "round({x}, {currency}) = {r} is more than half a minor unit away"
            );
        }
    }
}

/// A decimal from anywhere in the 96-bit range, at any scale and sign.
fn any_decimal(rng: &mut SmallRng) -> Decimal {
    let magnitude = 10i128
        .pow(rng.random_range(0..=29))
        .min(Decimal::MAX.mantissa());
    let m = rng.random_range(0..=magnitude);
    let x = Decimal::from_i128_with_scale(m, rng.random_range(0..=28));
    if rng.random_bool(0.2) {
        -x
    } else {
        x
    }
}

fn huge(rng: &mut SmallRng, low_exponent: u32) -> Decimal {
    Decimal::from_i128_with_scale(
        rng.random_range(10i128.pow(low_exponent)..=Decimal::MAX.mantissa()),
        0,
    )
}

#[test]
fn huge_prices_times_huge_quantities_are_an_error_not_a_panic() {
    let mut rng = SmallRng::seed_from_u64(7);
    for _ in 0..CASES {
        // q ≥ 10²¹ and a unit price ≥ 10⁸ make a product ≥ 10²⁹ > 7.9 × 10²⁸.
        let q = huge(&mut rng, 21);
        let price = Decimal::from(rng.random_range(100_000_000i64..=i64::MAX));
        let cheap_then_dear = vec![
            Tier {
                up_to: Some(d("1000")),
                unit_price: d("0.01"),
                flat_fee: Decimal::ZERO,
            },
            Tier {
                up_to: None,
                unit_price: price,
                flat_fee: Decimal::ZERO,
            },
        ];
        let models = [
            PriceModel::PerUnit { unit_price: price },
            PriceModel::Graduated {
                tiers: cheap_then_dear.clone(),
            },
            PriceModel::Volume {
                tiers: cheap_then_dear,
            },
            PriceModel::Package {
                package_size: Decimal::ONE,
                package_price: price,
            },
        ];
        for model in &models {
            assert_eq!(model.price(q), Err(MoneyError), "price({q}) of {model:?}");
            assert_eq!(
                model.marginal(Decimal::ZERO, q),
                Err(MoneyError),
                "marginal(0, {q}) of {model:?}"
            );
            let book = book("b", None, JANUARY, None, model.clone());
            let windows = [window(0, Measure::Total(q))];
            assert_eq!(
                rate_period("c", &Default::default(), &windows, &[&book]),
                Err(MoneyError)
            );
        }

        // Sums overflow too: two flat fees over half the range each, a period total past the range.
        let fee = huge(&mut rng, 28).max(Decimal::MAX / Decimal::TWO + Decimal::ONE);
        let fees = PriceModel::Graduated {
            tiers: vec![
                Tier {
                    up_to: Some(Decimal::ONE),
                    unit_price: Decimal::ZERO,
                    flat_fee: fee,
                },
                Tier {
                    up_to: None,
                    unit_price: Decimal::ZERO,
                    flat_fee: fee,
                },
            ],
        };
        assert_eq!(
            fees.price(Decimal::TWO),
            Err(MoneyError),
            "two fees of {fee}"
        );
        assert_eq!(fees.marginal(Decimal::MAX, Decimal::ONE), Err(MoneyError));
        let book = book(
            "b",
            None,
            JANUARY,
            None,
            PriceModel::PerUnit {
                unit_price: Decimal::ZERO,
            },
        );
        let windows = [
            window(0, Measure::Total(fee)),
            window(1, Measure::Total(fee)),
        ];
        assert_eq!(
            rate_period("c", &Default::default(), &windows, &[&book]),
            Err(MoneyError)
        );
        assert_eq!(money::add(fee, fee), Err(MoneyError));
        assert_eq!(money::sub(-fee, fee), Err(MoneyError));
        assert_eq!(money::mul(q, price), Err(MoneyError));
    }
}

#[test]
fn pricing_any_decimal_under_any_model_never_panics() {
    let mut rng = SmallRng::seed_from_u64(8);
    for _ in 0..CASES {
        // Increasing bounds (until they saturate at the top of the range), the last tier open.
        let n = rng.random_range(1..=4);
        let mut bound = Decimal::ZERO;
        let tiers: Vec<Tier> = (0..n)
            .map(|i| Tier {
                up_to: (i + 1 < n).then(|| {
                    bound = bound
                        .saturating_add(any_decimal(&mut rng).abs().saturating_add(Decimal::ONE));
                    bound
                }),
                unit_price: any_decimal(&mut rng),
                flat_fee: any_decimal(&mut rng),
            })
            .collect();
        let models = [
            PriceModel::PerUnit {
                unit_price: any_decimal(&mut rng),
            },
            PriceModel::Graduated {
                tiers: tiers.clone(),
            },
            PriceModel::Volume { tiers },
            PriceModel::Package {
                package_size: any_decimal(&mut rng),
                package_price: any_decimal(&mut rng),
            },
        ];
        let (from, add) = (any_decimal(&mut rng), any_decimal(&mut rng));
        for model in &models {
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                (model.price(from), model.marginal(from, add))
            }));
            assert!(
                outcome.is_ok(),
                "panicked pricing {from} (+ {add}) under {model:?}"
            );
        }
    }
}

// ---- rate_period -------------------------------------------------------------------------------------

/// 2024-01-01T00:00:00Z: the period the rating tests use, 744 hourly windows long.
const JANUARY: i64 = 1_704_067_200;
const HOURS: i64 = 31 * 24;

fn window(hour: i64, measure: Measure) -> WindowUsage {
    WindowUsage {
        window_start: JANUARY + hour * 3600,
        window_end: JANUARY + (hour + 1) * 3600,
        measure,
    }
}

/// `n` windows at distinct random hours of the period, in random order.
fn windows(
    rng: &mut SmallRng,
    n: usize,
    mut measure: impl FnMut(&mut SmallRng, i64) -> Measure,
) -> Vec<WindowUsage> {
    let mut hours: Vec<i64> = (0..HOURS).collect();
    hours.shuffle(rng);
    hours.truncate(n);
    hours
        .into_iter()
        .map(|h| window(h, measure(rng, h)))
        .collect()
}

/// A book (times in seconds).
fn book(
    id: &str,
    customer: Option<&str>,
    from: i64,
    to: Option<i64>,
    model: PriceModel,
) -> PriceBook {
    PriceBook {
        entries: Default::default(),
        dimensions: Default::default(),
        price_book_id: id.into(),
        meter: "api_calls".into(),
        customer_id: customer.map(str::to_owned),
        currency: "USD".into(),
        effective_from: from * 1_000_000,
        effective_to: to.map(|t| t * 1_000_000),
        model,
        minimum_per_period: None,
    }
}

fn graduated_book(
    rng: &mut SmallRng,
    id: &str,
    customer: Option<&str>,
    from: i64,
    to: Option<i64>,
) -> PriceBook {
    book(
        id,
        customer,
        from,
        to,
        PriceModel::Graduated {
            tiers: tiers(rng, false),
        },
    )
}

/// The period-to-date quantity after `windows` (all of them, in time order), from scratch.
fn ptd_reference(windows: &[&WindowUsage]) -> Decimal {
    let mut total = Decimal::ZERO;
    let mut max = Decimal::ZERO; // the tests' max values are never negative
    let mut distinct = HashSet::new();
    let mut latest: Option<(i64, &str, Decimal)> = None;
    for w in windows {
        match &w.measure {
            Measure::Total(v) => total += v,
            Measure::Max(v) => max = max.max(*v),
            Measure::Unique(values) => distinct.extend(values.iter()),
            Measure::Latest {
                time_micros,
                event_id,
                value,
            } => {
                if latest.is_none_or(|(t, id, _)| (*time_micros, event_id.as_str()) > (t, id)) {
                    latest = Some((*time_micros, event_id, *value));
                }
            }
        }
    }
    match windows.first().map(|w| &w.measure) {
        None => Decimal::ZERO,
        Some(Measure::Total(_)) => total,
        Some(Measure::Max(_)) => max,
        Some(Measure::Unique(_)) => Decimal::from(distinct.len()),
        Some(Measure::Latest { .. }) => latest.map_or(Decimal::ZERO, |(_, _, v)| v),
    }
}

/// SPEC §5 read literally, O(n²): for each window in time order, the ptd before and including it from
/// scratch, priced by the customer's book in force at the window's start, else the default one.
fn rate_reference(customer: &str, windows: &[WindowUsage], books: &[&PriceBook]) -> Vec<Charge> {
    let mut ordered: Vec<&WindowUsage> = windows.iter().collect();
    ordered.sort_by_key(|w| w.window_start);
    let in_force = |scope: Option<&str>, at: i64| {
        books.iter().copied().find(|b| {
            b.customer_id.as_deref() == scope
                && b.effective_from <= at
                && b.effective_to.is_none_or(|to| at < to)
        })
    };
    let mut charges = Vec::new();
    for i in 0..ordered.len() {
        let w = ordered[i];
        let at = w.window_start * 1_000_000;
        let Some(book) = in_force(Some(customer), at).or_else(|| in_force(None, at)) else {
            continue;
        };
        let before = ptd_reference(&ordered[..i]);
        let including = ptd_reference(&ordered[..=i]);
        charges.push(Charge {
            dimensions: Default::default(),
            window_start: w.window_start,
            window_end: w.window_end,
            quantity: including - before,
            amount: book.model.price(including).unwrap() - book.model.price(before).unwrap(),
            currency: book.currency.as_str().into(),
            price_book_id: book.price_book_id.as_str().into(),
        });
    }
    charges
}

fn sums(charges: &[Charge]) -> (Decimal, Decimal) {
    charges
        .iter()
        .fold((Decimal::ZERO, Decimal::ZERO), |(q, a), c| {
            (q + c.quantity, a + c.amount)
        })
}

/// Rates `windows` under one book covering the whole period, checks the charges against the reference
/// and against rating the same windows in another order, and returns (Σ quantities, Σ amounts).
fn rate_under_one_book(
    rng: &mut SmallRng,
    windows: &mut [WindowUsage],
) -> (PriceBook, Decimal, Decimal) {
    let from = JANUARY - rng.random_range(0..=86_400 * 60);
    let to = rng
        .random_bool(0.5)
        .then_some(JANUARY + HOURS * 3600 + rng.random_range(0..=86_400));
    let book = graduated_book(rng, "g", None, from, to);
    let charges = rate_period("acme", &Default::default(), windows, &[&book]).unwrap();
    assert_eq!(charges.len(), windows.len(), "one charge per window");
    assert!(charges
        .windows(2)
        .all(|p| p[0].window_start < p[1].window_start));
    assert_eq!(
        charges,
        rate_reference("acme", windows, &[&book]),
        "{windows:?} under {book:?}"
    );
    windows.shuffle(rng);
    assert_eq!(
        charges,
        rate_period("acme", &Default::default(), windows, &[&book]).unwrap(),
        "another order"
    );
    let (quantity, amount) = sums(&charges);
    (book, quantity, amount)
}

#[test]
fn a_periods_total_windows_are_charged_the_tiered_price_of_their_sum_in_any_order() {
    assert_eq!(
        period_of(JANUARY + 3 * 86_400),
        (JANUARY, JANUARY + HOURS * 3600)
    );
    let mut rng = SmallRng::seed_from_u64(9);
    for _ in 0..CASES / 5 {
        let n = rng.random_range(1..=60);
        let mut ws = windows(&mut rng, n, |rng, _| {
            Measure::Total(if rng.random_bool(0.1) {
                Decimal::ZERO
            } else {
                decimal(rng, 100_000, 2)
            })
        });
        let total: Decimal = ws
            .iter()
            .map(|w| match w.measure {
                Measure::Total(v) => v,
                _ => unreachable!(),
            })
            .sum();
        let (book, quantity, amount) = rate_under_one_book(&mut rng, &mut ws);
        assert_eq!(quantity, total);
        assert_eq!(
            amount,
            book.model.price(total).unwrap(),
            "{ws:?} under {book:?}"
        );
    }
}

#[test]
fn a_periods_max_windows_add_up_to_the_maximum() {
    let mut rng = SmallRng::seed_from_u64(10);
    for _ in 0..CASES / 5 {
        let n = rng.random_range(1..=60);
        let mut ws = windows(&mut rng, n, |rng, _| Measure::Max(decimal(rng, 100_000, 2)));
        let max = ws
            .iter()
            .map(|w| match w.measure {
                Measure::Max(v) => v,
                _ => unreachable!(),
            })
            .max()
            .unwrap();
        let (book, quantity, amount) = rate_under_one_book(&mut rng, &mut ws);
        assert_eq!(quantity, max);
        assert_eq!(amount, book.model.price(max).unwrap());
    }
}

#[test]
fn a_periods_unique_windows_add_up_to_the_number_of_distinct_values() {
    let mut rng = SmallRng::seed_from_u64(11);
    for _ in 0..CASES / 5 {
        let n = rng.random_range(1..=60);
        // Few values, so windows share them; a window may list a value twice.
        let mut ws = windows(&mut rng, n, |rng, _| {
            let k = rng.random_range(0..=5);
            Measure::Unique(
                (0..k)
                    .map(|_| format!("user_{}", rng.random_range(0..40)))
                    .collect(),
            )
        });
        let distinct: HashSet<&String> = ws
            .iter()
            .flat_map(|w| match &w.measure {
                Measure::Unique(values) => values.iter(),
                _ => unreachable!(),
            })
            .collect();
        let distinct = Decimal::from(distinct.len());
        let (book, quantity, amount) = rate_under_one_book(&mut rng, &mut ws);
        assert_eq!(quantity, distinct);
        assert_eq!(amount, book.model.price(distinct).unwrap());
    }
}

#[test]
fn a_periods_latest_windows_add_up_to_the_latest_value() {
    let mut rng = SmallRng::seed_from_u64(12);
    for _ in 0..CASES / 5 {
        let n = rng.random_range(1..=60);
        let mut ws = windows(&mut rng, n, |rng, hour| Measure::Latest {
            time_micros: (JANUARY + hour * 3600) * 1_000_000 + rng.random_range(0..3_600_000_000),
            event_id: format!("e{}", rng.random_range(0..1000)),
            value: decimal(rng, 100_000, 2) - Decimal::from(100),
        });
        let latest = ws.iter().max_by_key(|w| w.window_start).unwrap();
        let Measure::Latest { value, .. } = latest.measure else {
            unreachable!()
        };
        let (book, quantity, amount) = rate_under_one_book(&mut rng, &mut ws);
        assert_eq!(quantity, value);
        assert_eq!(amount, book.model.price(value).unwrap());
    }
}

/// Windows of any measure kind, all of one kind.
fn any_windows(rng: &mut SmallRng, n: usize) -> Vec<WindowUsage> {
    match rng.random_range(0..4) {
        0 => windows(rng, n, |rng, _| Measure::Total(decimal(rng, 100_000, 2))),
        1 => windows(rng, n, |rng, _| Measure::Max(decimal(rng, 100_000, 2))),
        2 => windows(rng, n, |rng, _| {
            Measure::Unique(
                (0..rng.random_range(0..=5))
                    .map(|_| format!("u{}", rng.random_range(0..40)))
                    .collect(),
            )
        }),
        _ => windows(rng, n, |rng, hour| Measure::Latest {
            time_micros: (JANUARY + hour * 3600) * 1_000_000 + rng.random_range(0..3_600_000_000),
            event_id: format!("e{}", rng.random_range(0..1000)),
            value: decimal(rng, 100_000, 2),
        }),
    }
}

#[test]
fn windows_before_a_book_starts_are_not_charged_but_count_towards_the_period() {
    let mut rng = SmallRng::seed_from_u64(13);
    for _ in 0..CASES / 5 {
        let n = rng.random_range(1..=60);
        let ws = any_windows(&mut rng, n);
        // Starts anywhere in the period, on an hour or not.
        let from = JANUARY + rng.random_range(0..HOURS * 3600);
        let book = graduated_book(&mut rng, "late", None, from, None);
        let charges = rate_period("acme", &Default::default(), &ws, &[&book]).unwrap();
        assert_eq!(
            charges,
            rate_reference("acme", &ws, &[&book]),
            "{ws:?} under {book:?}"
        );

        let mut ordered: Vec<&WindowUsage> = ws.iter().collect();
        ordered.sort_by_key(|w| w.window_start);
        let unpriced = ordered.iter().take_while(|w| w.window_start < from).count();
        assert_eq!(
            charges.len(),
            n - unpriced,
            "windows before {from} get no charge"
        );
        // What the book charges is the price of the period's quantity less that of the usage before it.
        let before = book
            .model
            .price(ptd_reference(&ordered[..unpriced]))
            .unwrap();
        let (_, amount) = sums(&charges);
        assert_eq!(
            amount,
            book.model.price(ptd_reference(&ordered)).unwrap() - before
        );
    }
}

#[test]
fn a_customers_own_book_beats_the_default() {
    let mut rng = SmallRng::seed_from_u64(14);
    for _ in 0..CASES / 5 {
        let n = rng.random_range(1..=60);
        let ws = any_windows(&mut rng, n);
        // The default book changes mid-period; acme's own book covers [own_from, own_to); globex has one too.
        let change = JANUARY + rng.random_range(0..HOURS) * 3600;
        let own_from = JANUARY + rng.random_range(0..HOURS) * 3600;
        let own_to = own_from + rng.random_range(1..=HOURS) * 3600;
        let mut books = [
            graduated_book(&mut rng, "default_1", None, JANUARY - 86_400, Some(change)),
            graduated_book(&mut rng, "default_2", None, change, None),
            graduated_book(&mut rng, "acme", Some("acme"), own_from, Some(own_to)),
            graduated_book(&mut rng, "globex", Some("globex"), JANUARY, None),
        ];
        books.shuffle(&mut rng);
        let books: Vec<&PriceBook> = books.iter().collect();
        for customer in ["acme", "initech"] {
            let charges = rate_period(customer, &Default::default(), &ws, &books).unwrap();
            assert_eq!(
                charges,
                rate_reference(customer, &ws, &books),
                "{customer}: {ws:?}"
            );
            assert_eq!(charges.len(), n);
            for c in &charges {
                let own =
                    customer == "acme" && own_from <= c.window_start && c.window_start < own_to;
                let expected = match (own, c.window_start < change) {
                    (true, _) => "acme",
                    (false, true) => "default_1",
                    (false, false) => "default_2",
                };
                assert_eq!(
                    c.price_book_id, expected,
                    "{customer} at {}",
                    c.window_start
                );
                let found = book_for(
                    books.iter().copied(),
                    customer,
                    &Default::default(),
                    c.window_start,
                )
                .unwrap();
                assert_eq!(found.price_book_id, expected);
            }
        }
    }
}
