//! `<p>/vehicles/<id>/state`: a VehicleState.

use super::fields::*;
use super::*;
use crate::model::{Phase, Vehicle, VehicleId, Wiring};

pub(super) fn decode_vehicle(id: VehicleId, o: &Obj) -> Result<Vehicle, InputError> {
    let soc = fraction("soc", o.num("soc")?)?;
    let capacity_kwh = within("capacity_kwh", o.num("capacity_kwh")?, MAX_VEHICLE_KWH)?;
    let max_charge_kw = rating("max_charge_kw", o.num("max_charge_kw")?)?;
    let max_discharge_kw = rating("max_discharge_kw", o.num("max_discharge_kw")?)?;
    let plugged_in = o.opt_bool("plugged_in")?.ok_or(InputError::Missing("plugged_in"))?;
    let min_soc = opt_fraction(o, "min_soc", 0.2)?;
    let max_soc = opt_fraction(o, "max_soc", 1.0)?;
    if min_soc > max_soc {
        return Err(invalid("min_soc", format!("must not exceed max_soc ({max_soc}), got {min_soc}")));
    }
    let wiring = match o.opt_uint("phases")? {
        None | Some(3) => Wiring::ThreePhase,
        Some(1) => Wiring::SinglePhase(match o.opt_str("phase")? {
            Some("L1") => Phase::L1,
            Some("L2") => Phase::L2,
            Some("L3") => Phase::L3,
            Some(other) => return Err(invalid("phase", format!("must be L1, L2 or L3, got `{other}`"))),
            None => return Err(InputError::Missing("phase")),
        }),
        Some(n) => return Err(invalid("phases", format!("must be 1 or 3, got {n}"))),
    };
    Ok(Vehicle {
        id,
        soc,
        capacity_kwh,
        max_charge_kw,
        max_discharge_kw,
        plugged_in,
        departure: o.opt_time("departure")?,
        min_soc,
        max_soc,
        segment: o.opt_id("segment")?,
        availability: opt_fraction(o, "availability", 1.0)?,
        availability_stated: o.get("availability").is_some(),
        degradation: opt_fraction(o, "degradation", 0.0)?,
        priority: opt_fraction(o, "priority", 0.5)?,
        price_per_kwh: o.opt_num("price_per_kwh")?.map_or(Ok(0.0), |x| {
            check("price_per_kwh", x, (0.0..=MAX_PRICE_PER_KWH).contains(&x), "within 0..=1000000")
        })?,
        group: o.opt_id("group")?,
        wiring,
        participant: o.opt_id("participant")?,
    })
}
