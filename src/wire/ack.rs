//! `<p>/vehicles/<id>/ack`: an Ack.

use super::fields::*;
use super::*;
use crate::model::{Ack, AckStatus};

pub(super) fn decode_ack(o: &Obj) -> Result<Ack, InputError> {
    let order_id = o.id("order_id")?;
    let status = match o.str("status")? {
        "accepted" => AckStatus::Accepted,
        "rejected" => AckStatus::Rejected,
        other => return Err(invalid("status", format!("must be `accepted` or `rejected`, got `{other}`"))),
    };
    let reason = o.opt_str("reason")?.map(str::to_owned);
    Ok(Ack { order_id, status, reason })
}
