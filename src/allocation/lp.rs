//! Optimal allocation: a linear program solved with clarabel.
//!
//! Variables: the power `p_i` of each candidate. Maximise `sum((score_i + M) * p_i)`, which
//! is the dispatch objective ([`crate::allocation::objective`]: weighted score less the
//! shortfall penalised at `M` per kW) up to a constant, subject to
//!
//! ```text
//! sum(p_i)                 <= target          (the shortfall is the slack of this row)
//! 0 <= p_i                 <= capacity_i      (effective capacity)
//! sum(coef_ri * p_i)       <= cap_r           for every shared row r (site, groups, phases)
//! ```
//!
//! so a target the constraints cannot meet gives the most they allow, never an infeasible
//! solve. A fleet with few classes of vehicles (same group, same wiring) is solved in the
//! exact class form ([`Classes`], [`ValueFunctions`]): class totals, each with its concave
//! piecewise-linear value, of which only a window of pieces is given to the solver and
//! widened where the answer falls outside it. The problem is built directly in compressed sparse column form into buffers that
//! are reused between solves. Only `Solved` and `AlmostSolved` count; anything else is an
//! [`LpError`] the caller handles (LP-first falls back to Smart). The solution is clamped
//! onto the constraints, so tolerances never let an order exceed a capacity or a limit.

use std::ops::Range;

use clarabel::algebra::CscMatrix;
use clarabel::solver::{DefaultSettings, DefaultSolver, IPSolver, SolverStatus, SupportedConeT};
use serde::{Deserialize, Serialize};

use crate::allocation::limits::LimitSet;
use crate::allocation::{objective, shortfall_penalty, Allocation, AllocationRequest, Dispatcher, SmartDispatcher};
use crate::model::StrategyKind;

/// The solver settings we choose (see the README's LP section for the measurements).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LpSettings {
    /// Iteration cap per solve (the LP converges in 10-15 iterations).
    pub max_iter: u32,
    /// Wall-clock cap per solve, seconds (clarabel measures it; the class form may solve up
    /// to [`MAX_ROUNDS`] + 1 times for one allocation).
    pub time_limit_s: f64,
    /// Absolute and relative duality-gap tolerance.
    pub tol_gap: f64,
    /// Feasibility tolerance.
    pub tol_feas: f64,
    /// Ruiz equilibration of the data.
    pub equilibrate: bool,
    /// Iterative refinement of each KKT solve.
    pub iterative_refinement: bool,
    /// Which exact formulation to build.
    pub formulation: Formulation,
}

/// The LP's two exact formulations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Formulation {
    /// By class when there are at most a third as many classes as vehicles, else per vehicle.
    Auto,
    /// One variable per vehicle.
    PerVehicle,
    /// Class totals with piecewise-linear value functions ([`Classes`]).
    ByClass,
}

impl Default for LpSettings {
    /// Tight gap (1e-8, the objective within 1e-6 of the optimum with room to spare);
    /// iterative refinement and equilibration off: the data is already well scaled
    /// (coefficients 1 and 1/3) and each costs a large share of the solve time for no
    /// accuracy gained on these problems (FACTS.md, and `benches/lp.rs`).
    fn default() -> Self {
        Self {
            max_iter: 100,
            time_limit_s: 1.0,
            tol_gap: 1e-8,
            tol_feas: 1e-8,
            equilibrate: false,
            iterative_refinement: false,
            formulation: Formulation::Auto,
        }
    }
}

/// What the solver did, recorded in `DispatchPlanCreated`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SolverReport {
    /// clarabel's status (`Solved`, `AlmostSolved`, `PrimalInfeasible`, ...).
    pub status: String,
    /// `per_vehicle` or `by_class` (see [`Classes`]).
    pub formulation: String,
    /// Interior-point iterations, over all rounds.
    pub iterations: u32,
    /// Solve time as clarabel measured it, over all rounds, ms.
    pub solve_time_ms: f64,
    /// The dispatch objective of the (clamped) solution.
    pub objective: f64,
    /// Variables.
    pub variables: usize,
    /// Constraint rows (of the last round).
    pub constraints: usize,
    /// Solves: the class form solves with a window of each class's pieces and widens the
    /// windows where the answer lands outside them (see [`ValueFunctions`]); 0 when nothing
    /// was solved (no candidates) and in plans recorded before there were rounds.
    #[serde(default)]
    pub rounds: u32,
}

/// The LP did not produce a usable solution.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("LP solver ended with status {}", report.status)]
pub struct LpError {
    /// What the solver reported.
    pub report: SolverReport,
}

/// CSC buffers kept between solves.
#[derive(Debug, Default)]
struct Buffers {
    colptr: Vec<usize>,
    rowval: Vec<usize>,
    nzval: Vec<f64>,
    q: Vec<f64>,
    b: Vec<f64>,
}

impl Buffers {
    fn clear(&mut self) {
        self.colptr.clear();
        self.rowval.clear();
        self.nzval.clear();
        self.q.clear();
        self.b.clear();
    }
}

/// Allocation by linear programming over the Smart scores.
#[derive(Debug, Default)]
pub struct LpDispatcher {
    /// Scores come from here (weights per type, fairness), so LP and Smart optimise the same.
    pub scoring: SmartDispatcher,
    /// Solver settings.
    pub settings: LpSettings,
    buf: Buffers,
    warm: Vec<Warm>,
}

/// A solver set up before (one of the last [`WARM_SOLVERS`] shapes), kept for a problem of
/// the same shape: a stream of setpoints to one fleet under the same limits builds the same
/// sparsity pattern as long as no class's window changes length (its total stays clear of
/// its first and last pieces), and then only the numbers change (clarabel's data update),
/// which saves the fill-reducing ordering and the symbolic factorisation. The result is the same as a fresh solver's, to the bit
/// (tested): the ordering depends on the pattern alone and every solve starts afresh.
struct Warm {
    settings: LpSettings,
    /// Rows (the variables are `colptr.len() - 1`).
    m: usize,
    colptr: Vec<usize>,
    rowval: Vec<usize>,
    solver: DefaultSolver<f64>,
}

impl std::fmt::Debug for Warm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warm").field("m", &self.m).field("n", &(self.colptr.len() - 1)).finish_non_exhaustive()
    }
}

impl LpDispatcher {
    /// An LP dispatcher scoring like `scoring`.
    pub fn new(scoring: SmartDispatcher, settings: LpSettings) -> Self {
        Self { scoring, settings, buf: Buffers::default(), warm: Vec::new() }
    }

    /// Solves for `req` with the given per-candidate `scores`.
    pub fn solve(&mut self, req: &AllocationRequest<'_>, scores: &[f64]) -> Result<(Vec<f64>, SolverReport), LpError> {
        let caps: Vec<f64> = req.candidates.iter().map(|c| c.capacity_kw.max(0.0)).collect();
        self.solve_for(req.target_kw, &caps, req.limits, scores)
    }

    /// Solves for `target` kW over candidates with capacities `caps` within `limits`,
    /// scored by `scores`. The result is clamped onto the constraints and polished
    /// ([`crate::allocation::repair::polish`]): no crumbs below the minimum order, no power left a hair
    /// under a bound.
    pub fn solve_for(
        &mut self,
        target: f64,
        caps: &[f64],
        limits: &LimitSet,
        scores: &[f64],
    ) -> Result<(Vec<f64>, SolverReport), LpError> {
        let n = caps.len();
        let caps: Vec<f64> = caps.iter().map(|c| c.max(0.0)).collect();
        let mut report = SolverReport {
            status: String::new(),
            formulation: "per_vehicle".to_owned(),
            iterations: 0,
            solve_time_ms: 0.0,
            objective: 0.0,
            variables: n,
            constraints: 0,
            rounds: 0,
        };
        if n == 0 {
            report.status = "Trivial".into();
            report.objective = objective(scores, &[], target);
            return Ok((Vec::new(), report));
        }
        let penalty = shortfall_penalty(scores);
        let value: Vec<f64> = scores.iter().map(|s| s + penalty).collect();
        let classes = Classes::of(limits, &value);
        let by_class = match self.settings.formulation {
            Formulation::Auto => classes.members.len() * 3 <= n,
            Formulation::PerVehicle => false,
            Formulation::ByClass => true,
        };
        let sol = if by_class {
            report.formulation = "by_class".to_owned();
            let f = ValueFunctions::of(&classes, &value, &caps, limits);
            let mut windows = f.first_windows(&classes, &value, &caps, limits, target);
            let k = classes.members.len();
            loop {
                report.rounds += 1;
                let (vars, m) = self.build_by_class(target, limits, &classes, &f, &windows);
                let sol = self.solve_built(m, vars, &mut report)?;
                if windows == f.all() || !f.widen(&mut windows, &sol[..k]) {
                    break sol;
                }
                if report.rounds >= MAX_ROUNDS {
                    windows = f.all();
                }
            }
        } else {
            let (vars, m) = self.build(target, &value, &caps, limits);
            report.rounds = 1;
            self.solve_built(m, vars, &mut report)?
        };
        let x = if by_class { classes.disaggregate(&sol[..classes.members.len()], &caps) } else { sol };
        let mut power = clamp_onto_constraints(&x, &caps, target, limits);
        crate::allocation::repair::polish(&mut power, &caps, target, limits, scores);
        report.objective = objective(scores, &power, target);
        Ok((power, report))
    }

    /// Solves the problem in the buffers (`m` rows, `vars` variables), adding to `report`'s
    /// iterations and time. Returns the solution, or the report as the error when the solver
    /// did not solve it.
    fn solve_built(&mut self, m: usize, vars: usize, report: &mut SolverReport) -> Result<Vec<f64>, LpError> {
        report.variables = vars;
        report.constraints = m;
        let solver = self.solver(m, vars);
        solver.solve();
        let sol = &solver.solution;
        report.status = format!("{:?}", sol.status);
        report.iterations += sol.iterations;
        report.solve_time_ms += sol.solve_time * 1000.0;
        if !matches!(sol.status, SolverStatus::Solved | SolverStatus::AlmostSolved)
            || sol.x.iter().any(|x| !x.is_finite())
        {
            return Err(LpError { report: report.clone() });
        }
        Ok(sol.x.clone())
    }

    /// A solver for the problem in the buffers (`m` rows, `vars` variables): a warm one
    /// with its numbers updated when the shape and the settings are the same, else a new one
    /// (kept for the next solves, the least recently used dropped).
    fn solver(&mut self, m: usize, vars: usize) -> &mut DefaultSolver<f64> {
        let b = &self.buf;
        let same = |w: &Warm| w.m == m && w.settings == self.settings && w.colptr == b.colptr && w.rowval == b.rowval;
        if let Some(at) = self.warm.iter().position(same) {
            let mut w = self.warm.remove(at);
            // Same pattern: only the values change (presolve is off, so updates are allowed).
            let updated = w
                .solver
                .update_A(&b.nzval)
                .and_then(|()| w.solver.update_q(&b.q))
                .and_then(|()| w.solver.update_b(&b.b))
                .is_ok();
            if updated {
                self.warm.insert(0, w);
                return &mut self.warm[0].solver;
            }
        }
        let settings = &self.settings;
        let warm = {
            let a =
                CscMatrix { m, n: vars, colptr: b.colptr.clone(), rowval: b.rowval.clone(), nzval: b.nzval.clone() };
            let p = CscMatrix::zeros((vars, vars));
            let cones = [SupportedConeT::NonnegativeConeT(m)];
            let clarabel = DefaultSettings {
                verbose: false,
                max_iter: settings.max_iter,
                time_limit: settings.time_limit_s,
                tol_gap_abs: settings.tol_gap,
                tol_gap_rel: settings.tol_gap,
                tol_feas: settings.tol_feas,
                equilibrate_enable: settings.equilibrate,
                iterative_refinement_enable: settings.iterative_refinement,
                // Our rows are all finite: nothing to presolve, and data updates need it off.
                presolve_enable: false,
                ..DefaultSettings::default()
            };
            let solver = DefaultSolver::new(&p, &b.q, &a, &b.b, &cones, clarabel);
            Warm { settings: settings.clone(), m, colptr: a.colptr, rowval: a.rowval, solver }
        };
        self.warm.truncate(WARM_SOLVERS - 1);
        self.warm.insert(0, warm);
        &mut self.warm[0].solver
    }

    /// The class form (see [`Classes`]): variables `T_k` (power of class k) and `v_k` (its
    /// value); rows: the target (with any row that is its twin: the site's), the other
    /// shared rows over `T`, `0 <= T_k <= U_k` (see [`ValueFunctions`]), and the pieces of
    /// each class's concave value function in its window, `v_k - c_j T_k <= f_j - c_j s_j`.
    /// Returns (variables, rows).
    fn build_by_class(
        &mut self,
        target: f64,
        limits: &LimitSet,
        classes: &Classes,
        f: &ValueFunctions,
        windows: &[Range<usize>],
    ) -> (usize, usize) {
        let k = classes.members.len();
        // A row every class counts against with coefficient 1 (the site's) reads
        // `sum(T) <= cap`, as the target's row does: one row with the lesser bound says both,
        // and a dense row less is a cheaper factorisation. The others are numbered on.
        let twin: Vec<bool> = (0..limits.rows.len())
            .map(|row| classes.rows.iter().all(|rows| rows.iter().any(|&(r, coef)| r == row && coef == 1.0)))
            .collect();
        let mut index = Vec::with_capacity(twin.len());
        let mut r = 0;
        for t in &twin {
            index.push(r);
            r += usize::from(!t);
        }
        self.buf.clear();
        let Buffers { colptr, rowval, nzval, q, b } = &mut self.buf;
        let sum_cap = limits.rows.iter().zip(&twin).filter(|(_, t)| **t).map(|(row, _)| row.cap_kw.max(0.0));
        b.push(sum_cap.fold(target.max(0.0), f64::min));
        b.extend(limits.rows.iter().zip(&twin).filter(|(_, t)| !**t).map(|(row, _)| row.cap_kw));
        b.extend_from_slice(&f.bound);
        b.extend(std::iter::repeat_n(0.0, k));
        let mut piece_base = Vec::with_capacity(k);
        for (c, window) in windows.iter().enumerate() {
            piece_base.push(b.len());
            let first = f.range[c].start;
            b.extend((first + window.start..first + window.end).map(|j| f.intercept[j]));
        }
        for (c, window) in windows.iter().enumerate() {
            colptr.push(rowval.len());
            rowval.push(0);
            nzval.push(1.0);
            for (row, coef) in classes.rows[c].iter().filter(|(row, _)| !twin[*row]) {
                rowval.push(1 + index[*row]);
                nzval.push(*coef);
            }
            rowval.push(1 + r + c);
            nzval.push(1.0);
            rowval.push(1 + r + k + c);
            nzval.push(-1.0);
            let first = f.range[c].start;
            for (row, j) in (first + window.start..first + window.end).enumerate() {
                rowval.push(piece_base[c] + row);
                nzval.push(-f.slope[j]);
            }
            q.push(0.0);
        }
        for (c, window) in windows.iter().enumerate() {
            colptr.push(rowval.len());
            for row in 0..window.len() {
                rowval.push(piece_base[c] + row);
                nzval.push(1.0);
            }
            q.push(-1.0);
        }
        colptr.push(rowval.len());
        (2 * k, b.len())
    }

    /// The per-vehicle form: one variable per vehicle; rows: the target, `p_i <= u_i`,
    /// `-p_i <= 0`, the shared rows. Returns (variables, rows).
    fn build(&mut self, target: f64, value: &[f64], caps: &[f64], limits: &LimitSet) -> (usize, usize) {
        let n = caps.len();
        self.buf.clear();
        let Buffers { colptr, rowval, nzval, q, b } = &mut self.buf;
        let limit_row0 = 1 + 2 * n;
        for (i, (v, members)) in value.iter().zip(&limits.members).enumerate() {
            colptr.push(rowval.len());
            // sum(p) <= target
            rowval.push(0);
            nzval.push(1.0);
            // p_i <= cap_i
            rowval.push(1 + i);
            nzval.push(1.0);
            // -p_i <= 0
            rowval.push(1 + n + i);
            nzval.push(-1.0);
            for (r, coef) in members {
                rowval.push(limit_row0 + r);
                nzval.push(*coef);
            }
            q.push(-v);
        }
        colptr.push(rowval.len());
        b.push(target.max(0.0));
        b.extend_from_slice(caps);
        b.extend(std::iter::repeat_n(0.0, n));
        b.extend(limits.rows.iter().map(|r| r.cap_kw));
        (n, b.len())
    }
}

/// Vehicles with identical shared-row coefficients (same group, same wiring) form a class.
/// Within a class any optimum gives power by value order (moving a kW from a lower- to a
/// higher-valued member changes no row), so the LP can be solved over class totals with
/// each class's concave piecewise-linear value function, then split greedily: exact, and far
/// smaller when the fleet has few classes (a depot: ~20 feeders x 4 wirings).
#[derive(Debug)]
pub struct Classes {
    /// Members of each class, by descending value.
    pub members: Vec<Vec<usize>>,
    /// Shared-row coefficients of each class.
    pub rows: Vec<Vec<(usize, f64)>>,
}

impl Classes {
    /// The classes of `limits`' candidates, members sorted by `value`. Classes come in the
    /// order of their row coefficients, members by descending value (then index).
    pub fn of(limits: &LimitSet, value: &[f64]) -> Self {
        // One sort by coefficient list (compared in place, no key built per vehicle), then
        // each class alone by value.
        let key = |i: usize| limits.members[i].iter().map(|(r, c)| (*r, c.to_bits()));
        let mut order: Vec<usize> = (0..limits.members.len()).collect();
        order.sort_unstable_by(|&a, &b| key(a).cmp(key(b)).then(a.cmp(&b)));
        let mut classes = Classes { members: Vec::new(), rows: Vec::new() };
        for run in order.chunk_by(|&a, &b| key(a).eq(key(b))) {
            let mut members = run.to_vec();
            members.sort_unstable_by(|&a, &b| value[b].total_cmp(&value[a]).then(a.cmp(&b)));
            classes.rows.push(limits.members[members[0]].clone());
            classes.members.push(members);
        }
        classes
    }

    /// Splits class totals over members in value order.
    pub fn disaggregate(&self, totals: &[f64], caps: &[f64]) -> Vec<f64> {
        let mut p = vec![0.0; caps.len()];
        for (members, total) in self.members.iter().zip(totals) {
            let mut left = total.max(0.0);
            for &i in members {
                let give = caps[i].min(left);
                p[i] = give;
                left -= give;
            }
        }
        p
    }
}

/// Pieces kept on each side of the one in force when a class's window is opened or widened.
const WINDOW_SIDE: usize = 2;

/// Solvers kept warm: the shapes of the last solves. An allocation solved in one round has
/// one shape, one that needed a second round two; one of more rounds evicts them all and
/// sets up a solver per round (still exact, only slower).
const WARM_SOLVERS: usize = 3;

/// Rounds of widening after which every piece is kept (the next solve is the full class
/// form's).
const MAX_ROUNDS: u32 = 6;

/// The concave piecewise-linear value function of each class. Piece j of a class (from 0) is
/// the line `slope_j T + intercept_j`: the value when its members before j (by value) are
/// full and member j carries the rest; it is in force from `start_j` (the capacity of those before it).
/// The function is the least of its pieces on `[0, bound]`, and any subset of the pieces is
/// an upper bound on it, which is what lets the LP be solved with a window of each class's
/// pieces and widened only where the answer lands outside ([`ValueFunctions::widen`]).
///
/// `bound` (U_k) is what the class can carry: its capacity, or less where one of its rows
/// alone allows less with the rest of the fleet at zero. Pieces that start beyond it can never
/// be in force and are not kept. (The target is not part of the bound; it moves only the
/// windows.)
#[derive(Debug, Default)]
pub struct ValueFunctions {
    /// Per class, U_k.
    bound: Vec<f64>,
    /// Per class, its pieces in the vectors below.
    range: Vec<Range<usize>>,
    slope: Vec<f64>,
    intercept: Vec<f64>,
    start: Vec<f64>,
}

impl ValueFunctions {
    /// The value functions of `classes` under `value`, `caps` and `limits`.
    pub fn of(classes: &Classes, value: &[f64], caps: &[f64], limits: &LimitSet) -> Self {
        let mut f = ValueFunctions::default();
        for (members, rows) in classes.members.iter().zip(&classes.rows) {
            let by_rows = rows
                .iter()
                .filter(|(_, coef)| *coef > 0.0)
                .map(|(row, coef)| limits.rows[*row].cap_kw.max(0.0) / coef)
                .fold(f64::INFINITY, f64::min);
            let first = f.slope.len();
            let (mut u_before, mut f_before) = (0.0, 0.0);
            for &i in members {
                if f.slope.len() > first && u_before >= by_rows {
                    break;
                }
                f.slope.push(value[i]);
                f.intercept.push(f_before - value[i] * u_before);
                f.start.push(u_before);
                u_before += caps[i];
                f_before += value[i] * caps[i];
            }
            f.bound.push(u_before.min(by_rows));
            f.range.push(first..f.slope.len());
        }
        f
    }

    /// Pieces of class `c`.
    fn pieces(&self, c: usize) -> usize {
        self.range[c].len()
    }

    /// The piece of class `c` in force at `t` (its index within the class).
    fn in_force(&self, c: usize, t: f64) -> usize {
        self.start[self.range[c].clone()].partition_point(|&s| s <= t).saturating_sub(1)
    }

    /// The value of class `c` at `t`.
    fn at(&self, c: usize, t: f64) -> f64 {
        let j = self.range[c].start + self.in_force(c, t);
        self.slope[j] * t + self.intercept[j]
    }

    /// A window around the piece in force at `t`.
    fn window(&self, c: usize, t: f64) -> Range<usize> {
        let j = self.in_force(c, t);
        j.saturating_sub(WINDOW_SIDE)..(j + WINDOW_SIDE + 1).min(self.pieces(c))
    }

    /// The first windows: around the class totals of [`crate::allocation::greedy_fill`]
    /// (vehicles by value, each as far as its rows and the target allow, so no class goes
    /// beyond its bound). Where the rows do not
    /// overlap that fill is the optimum; where they do, the optimum is usually near it.
    pub fn first_windows(
        &self,
        classes: &Classes,
        value: &[f64],
        caps: &[f64],
        limits: &LimitSet,
        target: f64,
    ) -> Vec<Range<usize>> {
        let fill = crate::allocation::greedy_fill(value, caps, target, limits);
        classes
            .members
            .iter()
            .enumerate()
            .map(|(c, members)| self.window(c, members.iter().map(|&i| fill[i]).sum()))
            .collect()
    }

    /// Widens the window of every class whose windowed value function at its total `t`
    /// (the least of the window's pieces) is above the value function there (the piece in
    /// force was left out). When none is, the windowed problem's answer is a point of the
    /// full problem with the same objective: its optimum. Returns whether any window grew.
    pub fn widen(&self, windows: &mut [Range<usize>], t: &[f64]) -> bool {
        let mut grown = false;
        for (c, window) in windows.iter_mut().enumerate() {
            let t = t[c].clamp(0.0, self.bound[c]);
            let truth = self.at(c, t);
            let first = self.range[c].start;
            let windowed = (first + window.start..first + window.end)
                .map(|j| self.slope[j] * t + self.intercept[j])
                .fold(f64::INFINITY, f64::min);
            if windowed <= truth + 1e-12 * (1.0 + truth.abs()) {
                continue;
            }
            let around = self.window(c, t);
            let wider = window.start.min(around.start)..window.end.max(around.end);
            grown |= wider != *window;
            *window = wider;
        }
        grown
    }

    /// Every piece of every class.
    pub fn all(&self) -> Vec<Range<usize>> {
        self.range.iter().map(|r| 0..r.len()).collect()
    }
}

/// Projects a solver's answer onto the constraints: each power into `[0, cap]`, then every
/// shared row and the target row scaled down where tolerances left it a hair over.
pub fn clamp_onto_constraints(x: &[f64], caps: &[f64], target: f64, limits: &LimitSet) -> Vec<f64> {
    let mut p: Vec<f64> = x.iter().zip(caps).map(|(x, c)| x.clamp(0.0, *c)).collect();
    // Each row over its cap scales its members down by cap / load (loads as clamped); a
    // vehicle on several such rows takes each factor, in row order. One pass over the members.
    let over: Vec<Option<f64>> = limits
        .loads(&p)
        .into_iter()
        .zip(&limits.rows)
        .map(|(load, row)| (load > row.cap_kw).then(|| row.cap_kw / load))
        .collect();
    if over.iter().any(Option::is_some) {
        for (x, members) in p.iter_mut().zip(&limits.members) {
            for (r, _) in members {
                if let Some(f) = over[*r] {
                    *x *= f;
                }
            }
        }
    }
    let total: f64 = p.iter().sum();
    if total > target {
        let f = target.max(0.0) / total;
        p.iter_mut().for_each(|x| *x *= f);
    }
    p
}

impl Dispatcher for LpDispatcher {
    fn kind(&self) -> StrategyKind {
        StrategyKind::Lp
    }

    /// The LP's allocation; when the solver fails, the Smart allocation with the failure
    /// noted (use [`LpDispatcher::solve`] to handle failures yourself).
    fn allocate(&mut self, req: &AllocationRequest<'_>) -> Allocation {
        let scores = self.scoring.scores(req);
        match self.solve(req, &scores) {
            Ok((power_kw, report)) => Allocation {
                strategy: StrategyKind::Lp,
                power_kw,
                scores,
                rounds: report.iterations,
                solver: Some(report),
                note: None,
                weights: Some(self.scoring.weights[usize::from(req.signal.kind.code())]),
            },
            Err(e) => {
                let mut a = self.scoring.allocate(req);
                a.note = Some(format!("{e}; the Smart strategy ran instead"));
                a.solver = Some(e.report);
                a
            }
        }
    }
}

/// What the repair did, for the plan's record.
#[derive(Clone, Debug, PartialEq)]
pub struct Repaired {
    /// What the strategy placed, kW.
    pub before_kw: f64,
    /// What is placed after the repair, kW.
    pub after_kw: f64,
}

/// Makes `power` deliver min(`target`, the most `caps` and `limits` allow): if it falls
/// short under shared rows, the LP over `scores` is solved and taken when it places more.
/// Returns what changed, if anything. A solver failure leaves `power` as it is.
pub fn fill_to_max(
    lp: &mut LpDispatcher,
    power: &mut Vec<f64>,
    caps: &[f64],
    target: f64,
    limits: &LimitSet,
    scores: &[f64],
) -> Option<Repaired> {
    crate::allocation::repair::polish(power, caps, target, limits, scores);
    let before_kw: f64 = power.iter().sum();
    let ceiling = crate::allocation::repair::upper_bound(caps, target, limits);
    if before_kw >= ceiling - crate::allocation::EPS_KW.max(1e-9 * ceiling) || limits.is_empty() {
        return None;
    }
    let (lp_power, _) = lp.solve_for(target, caps, limits, scores).ok()?;
    let after_kw: f64 = lp_power.iter().sum();
    if after_kw <= before_kw + crate::allocation::EPS_KW {
        return None;
    }
    *power = lp_power;
    Some(Repaired { before_kw, after_kw })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::allocation::limits::Limits;
    use crate::allocation::{greedy_fill, Candidate, EqualDispatcher};
    use crate::model::{Direction, Phase, Signal, SignalType, Vehicle, Wiring};
    use crate::time::Timestamp;

    fn signal(direction: Direction, kw: f64) -> Signal {
        Signal::new("s", SignalType::Fcr, direction, kw, Timestamp::from_millis(0))
    }

    /// A random depot: vehicles with capacities, groups and wiring, and site limits.
    #[derive(Debug, Clone)]
    struct Depot {
        vehicles: Vec<Vehicle>,
        limits: Limits,
        target: f64,
        down: bool,
    }

    fn depot(phases: bool) -> impl Strategy<Value = Depot> {
        depot_of(phases, 1..40, 5, 4)
    }

    /// A depot of few classes (up to three groups, counting no group, and two wirings) with
    /// many members each: the class form's windows hold only some of each class's pieces.
    fn crowded_depot() -> impl Strategy<Value = Depot> {
        depot_of(true, 20..120, 3, 2)
    }

    /// Vehicles in `groups` groups (the last means none) with `wirings` wirings.
    fn depot_of(
        phases: bool,
        vehicles: std::ops::Range<usize>,
        groups: usize,
        wirings: usize,
    ) -> impl Strategy<Value = Depot> {
        let vehicle = (0.25f64..0.95, 20.0f64..100.0, 1.0f64..50.0, 0..groups, 0..wirings, 0.3f64..=1.0, 0.0f64..0.5);
        (
            prop::collection::vec(vehicle, vehicles),
            prop::option::of(20.0f64..800.0),
            prop::collection::vec(5.0f64..150.0, 4),
            prop::option::of(10.0f64..300.0),
            1.0f64..1500.0,
            any::<bool>(),
        )
            .prop_map(move |(specs, site, group_caps, phase_kw, target, down)| {
                let vehicles = specs
                    .into_iter()
                    .enumerate()
                    .map(|(i, (soc, cap, kw, group, wiring, avail, degr))| {
                        let mut v = Vehicle::new(format!("v{i:02}"), soc, cap, kw);
                        v.availability = avail;
                        v.degradation = degr;
                        v.priority = (i % 7) as f64 / 6.0;
                        v.group = (group + 1 < groups).then(|| format!("g{group}"));
                        v.wiring = match wiring {
                            1 => Wiring::SinglePhase(Phase::L1),
                            2 => Wiring::SinglePhase(Phase::L2),
                            3 => Wiring::SinglePhase(Phase::L3),
                            _ => Wiring::ThreePhase,
                        };
                        v
                    })
                    .collect();
                let groups: BTreeMap<String, f64> =
                    group_caps.into_iter().enumerate().map(|(g, c)| (format!("g{g}"), c)).collect();
                let limits = Limits {
                    export_kw: site,
                    import_kw: site.map(|s| s * 1.5),
                    groups,
                    phase_kw: if phases { phase_kw } else { None },
                };
                Depot { vehicles, limits, target, down }
            })
    }

    /// Runs `f` with the request for `d`.
    fn with_request<T>(d: &Depot, f: impl FnOnce(&AllocationRequest<'_>) -> T) -> T {
        let direction = if d.down { Direction::Down } else { Direction::Up };
        let sig = signal(direction, d.target);
        let cands: Vec<Candidate<'_>> = d
            .vehicles
            .iter()
            .map(|v| Candidate {
                vehicle: v,
                capacity_kw: v.effective_capacity(direction, 0.0, 900.0),
                participation: 0.0,
            })
            .collect();
        let limits = LimitSet::new(&d.limits, direction, &cands);
        f(&AllocationRequest {
            signal: &sig,
            now: Timestamp::from_millis(0),
            target_kw: d.target,
            candidates: &cands,
            limits: &limits,
        })
    }

    fn assert_feasible(req: &AllocationRequest<'_>, power: &[f64], who: &str) -> Result<(), TestCaseError> {
        for (p, c) in power.iter().zip(req.candidates) {
            prop_assert!(*p >= 0.0 && *p <= c.capacity_kw + 1e-9, "{who}: {p} outside [0, {}]", c.capacity_kw);
        }
        prop_assert!(power.iter().sum::<f64>() <= req.target_kw + 1e-6, "{who}: over target");
        let v = req.limits.violations(power, 1e-6);
        prop_assert!(v.is_empty(), "{who}: limits exceeded {v:?}");
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn no_strategy_exceeds_a_capacity_or_a_limit(d in depot(true)) {
            with_request(&d, |req| {
                let mut smart = SmartDispatcher::default();
                let s = smart.allocate(req);
                assert_feasible(req, &s.power_kw, "smart")?;
                let e = EqualDispatcher.allocate(req);
                assert_feasible(req, &e.power_kw, "equal")?;
                let scores = smart.scores(req);
                let (lp, report) = LpDispatcher::default().solve(req, &scores).map_err(|e| TestCaseError::fail(e.to_string()))?;
                assert_feasible(req, &lp, "lp")?;
                // The LP optimises the objective Smart is judged by: it never does worse on what
                // is ordered (both without amounts below the minimum order).
                let caps: Vec<f64> = req.candidates.iter().map(|c| c.capacity_kw).collect();
                let mut ordered = s.power_kw.clone();
                crate::allocation::repair::polish(&mut ordered, &caps, req.target_kw, req.limits, &scores);
                let (lo, so) = (objective(&scores, &lp, req.target_kw), objective(&scores, &ordered, req.target_kw));
                prop_assert!(lo >= so - 1e-6 * so.abs().max(1.0), "lp {lo} < smart {so} ({})", report.status);
                Ok(())
            })?;
        }

        #[test]
        fn without_phase_limits_the_lp_matches_the_exact_greedy_optimum(d in depot(false)) {
            with_request(&d, |req| {
                let scores = SmartDispatcher::default().scores(req);
                let caps: Vec<f64> = req.candidates.iter().map(|c| c.capacity_kw).collect();
                // What is ordered: the greedy optimum without the crumbs below the minimum
                // order that the planner drops (polished as the LP's answer is).
                let mut greedy = greedy_fill(&scores, &caps, req.target_kw, req.limits);
                crate::allocation::repair::polish(&mut greedy, &caps, req.target_kw, req.limits, &scores);
                let (lp, _) = LpDispatcher::default().solve(req, &scores).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let (g, l) = (objective(&scores, &greedy, req.target_kw), objective(&scores, &lp, req.target_kw));
                prop_assert!(l >= g - 1e-6 * g.abs().max(1.0), "lp {l} vs greedy {g}");
                let (gt, lt) = (greedy.iter().sum::<f64>(), lp.iter().sum::<f64>());
                prop_assert!(lt >= gt - 1e-6 * gt.max(1.0), "lp places {lt} kW, greedy {gt} kW");
                Ok(())
            })?;
        }
    }

    /// The most `req`'s candidates can place within its limits and target: the LP with no
    /// preference between vehicles, per vehicle (the repair solves the class form).
    fn exact_max(req: &AllocationRequest<'_>) -> f64 {
        let settings = LpSettings { formulation: Formulation::PerVehicle, ..LpSettings::default() };
        let n = req.candidates.len();
        let (p, _) = LpDispatcher::new(SmartDispatcher::default(), settings).solve(req, &vec![0.0; n]).unwrap();
        p.iter().sum()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The delivery guarantee: whatever the strategy, what is placed is the most the
        /// capacities and the overlapping group and phase rows allow (up to the target).
        #[test]
        fn every_strategy_places_the_most_the_limits_allow(d in depot(true)) {
            with_request(&d, |req| {
                let max = exact_max(req);
                let caps: Vec<f64> = req.candidates.iter().map(|c| c.capacity_kw).collect();
                let ub = crate::allocation::repair::upper_bound(&caps, req.target_kw, req.limits);
                prop_assert!(ub >= max - 1e-6 * max.max(1.0), "the repair's bound {ub} is below the maximum {max}");
                let segments: BTreeMap<String, crate::config::Segment> = [(
                    "fleet".to_owned(),
                    crate::config::Segment { lp: false, fallback: true, weights: crate::allocation::Weights::default_for(SignalType::Dr) },
                )]
                .into();
                for kind in [StrategyKind::Equal, StrategyKind::Smart, StrategyKind::Segmented, StrategyKind::Lp] {
                    let mut s = crate::allocation::policy::Strategies::new(kind, SmartDispatcher::default(), LpSettings::default());
                    s.segmented = Some(Box::new(crate::allocation::segments::SegmentedSmartDispatcher::new(segments.clone(), SmartDispatcher::default())));
                    let a = s.allocate(req);
                    assert_feasible(req, &a.power_kw, kind.name())?;
                    let placed: f64 = a.power_kw.iter().sum();
                    // Up to one minimum order: an amount below it is never ordered, and where the
                    // rows leave no vehicle room to take it, it is lost whoever allocates.
                    let tol = 1e-6 * max.max(1.0) + crate::allocation::MIN_ORDER_KW;
                    prop_assert!(placed >= max - tol, "{}: {placed} kW placed, {max} kW possible", kind.name());
                }
                Ok(())
            })?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(100))]

        #[test]
        fn the_class_form_and_the_per_vehicle_form_agree(d in prop_oneof![depot(true), crowded_depot()]) {
            with_request(&d, |req| {
                let scores = SmartDispatcher::default().scores(req);
                let solve = |formulation| {
                    let settings = LpSettings { formulation, ..LpSettings::default() };
                    LpDispatcher::new(SmartDispatcher::default(), settings).solve(req, &scores)
                };
                let (a, ra) = solve(Formulation::PerVehicle).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let (b, rb) = solve(Formulation::ByClass).map_err(|e| TestCaseError::fail(e.to_string()))?;
                assert_feasible(req, &b, "by class")?;
                prop_assert_eq!((ra.formulation.as_str(), rb.formulation.as_str()), ("per_vehicle", "by_class"));
                let (oa, ob) = (objective(&scores, &a, req.target_kw), objective(&scores, &b, req.target_kw));
                // Both answers are polished (amounts below the minimum order dropped or moved);
                // where the two optima differ in such a crumb, the objectives differ by at most
                // its penalised value.
                let crumb = crate::allocation::shortfall_penalty(&scores) * crate::allocation::MIN_ORDER_KW;
                prop_assert!((oa - ob).abs() <= 1e-6 * oa.abs().max(1.0) + crumb, "per vehicle {oa} vs by class {ob}");
                Ok(())
            })?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The warm solver (same shape: only the numbers updated) answers every problem to
        /// the bit as a fresh solver does: the same target, another target, other scores,
        /// in turn, so that `audit` re-runs a plan with the result the gateway had.
        #[test]
        fn a_warm_solver_answers_to_the_bit_as_a_fresh_one(d in prop_oneof![depot(true), crowded_depot()], scale in 0.2f64..1.0) {
            with_request(&d, |req| {
                let scores = SmartDispatcher::default().scores(req);
                let other_scores: Vec<f64> = scores.iter().map(|s| s * 1.1 + 0.01).collect();
                let less = AllocationRequest {
                    signal: req.signal,
                    now: req.now,
                    target_kw: req.target_kw * scale,
                    candidates: req.candidates,
                    limits: req.limits,
                };
                let bits = |r: Result<(Vec<f64>, SolverReport), LpError>| {
                    r.ok().map(|(x, rep)| (x.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), rep.iterations))
                };
                let mut warm = LpDispatcher::default();
                for (r, sc) in [(req, &scores), (&less, &scores), (req, &other_scores), (req, &scores), (&less, &other_scores)] {
                    let fresh = bits(LpDispatcher::default().solve(r, sc));
                    prop_assert_eq!(bits(warm.solve(r, sc)), fresh);
                }
                Ok(())
            })?;
        }
    }

    #[test]
    fn overlapping_phase_limits_are_where_the_lp_beats_greedy() {
        // Two single-phase vehicles on L1 with the best scores and a three-phase one: with
        // L1 capped, greedy fills L1 with the single-phase vehicles and then the three-phase
        // one can add only what L1 has left; the LP gives the three-phase vehicle room.
        let mut a = Vehicle::new("a", 0.9, 80.0, 10.0);
        a.wiring = Wiring::SinglePhase(Phase::L1);
        a.priority = 1.0;
        let mut b = a.clone();
        b.id = "b".into();
        let mut c = Vehicle::new("c", 0.9, 80.0, 30.0);
        c.priority = 0.0;
        let d = Depot {
            vehicles: vec![a, b, c],
            limits: Limits { phase_kw: Some(12.0), ..Limits::default() },
            target: 40.0,
            down: false,
        };
        with_request(&d, |req| {
            let scores = SmartDispatcher::default().scores(req);
            let caps: Vec<f64> = req.candidates.iter().map(|c| c.capacity_kw).collect();
            let greedy = greedy_fill(&scores, &caps, req.target_kw, req.limits);
            let (lp, report) = LpDispatcher::default().solve(req, &scores).unwrap();
            assert_eq!(report.status, "Solved");
            assert!(lp.iter().sum::<f64>() > greedy.iter().sum::<f64>() + 1.0, "lp {lp:?} greedy {greedy:?}");
            assert!(objective(&scores, &lp, 40.0) > objective(&scores, &greedy, 40.0));
        });
    }

    #[test]
    fn windows_far_from_the_optimum_are_widened_until_the_answer_is_exact() {
        // The greedy fill that opens the windows gives L1 to the best-scored single-phase
        // vehicles, and then no three-phase vehicle fits; the optimum gives all three phases
        // to the three-phase vehicles and nothing to the single-phase ones: far outside the
        // first windows of both classes.
        let mut vehicles: Vec<Vehicle> = (0..30)
            .map(|i| {
                let mut v = Vehicle::new(format!("s{i:02}"), 0.9, 80.0, 7.0);
                v.wiring = Wiring::SinglePhase(Phase::L1);
                v.priority = 1.0 - 0.01 * i as f64;
                v
            })
            .collect();
        vehicles.extend((0..30).map(|i| {
            let mut v = Vehicle::new(format!("t{i:02}"), 0.9, 80.0, 11.0);
            v.priority = 0.3 - 0.01 * i as f64;
            v
        }));
        let d = Depot {
            vehicles,
            limits: Limits { phase_kw: Some(60.0), ..Limits::default() },
            target: 300.0,
            down: false,
        };
        with_request(&d, |req| {
            let scores = SmartDispatcher::default().scores(req);
            let caps: Vec<f64> = req.candidates.iter().map(|c| c.capacity_kw).collect();
            assert!(greedy_fill(&scores, &caps, req.target_kw, req.limits).iter().sum::<f64>() < 61.0);
            let (by_class, report) = LpDispatcher::default().solve(req, &scores).unwrap();
            assert_eq!(report.formulation, "by_class");
            assert!(report.rounds >= 2, "{report:?}");
            let settings = LpSettings { formulation: Formulation::PerVehicle, ..LpSettings::default() };
            let (per_vehicle, _) = LpDispatcher::new(SmartDispatcher::default(), settings).solve(req, &scores).unwrap();
            assert!((by_class.iter().sum::<f64>() - 180.0).abs() < 1e-6, "{by_class:?}");
            let (a, b) = (objective(&scores, &by_class, 300.0), objective(&scores, &per_vehicle, 300.0));
            assert!((a - b).abs() <= 1e-6 * a.abs(), "by class {a} vs per vehicle {b}");
        });
    }

    #[test]
    fn an_unreachable_target_gives_the_most_the_limits_allow() {
        let vehicles: Vec<Vehicle> = (0..5).map(|i| Vehicle::new(format!("v{i}"), 0.9, 80.0, 20.0)).collect();
        let d = Depot {
            vehicles,
            limits: Limits { export_kw: Some(55.0), ..Limits::default() },
            target: 500.0,
            down: false,
        };
        with_request(&d, |req| {
            let (lp, report) = LpDispatcher::default().solve(req, &SmartDispatcher::default().scores(req)).unwrap();
            assert!((lp.iter().sum::<f64>() - 55.0).abs() < 1e-6, "{lp:?} {report:?}");
        });
    }

    #[test]
    fn a_solver_failure_is_an_error_not_an_allocation() {
        let vehicles: Vec<Vehicle> = (0..5).map(|i| Vehicle::new(format!("v{i}"), 0.9, 80.0, 20.0)).collect();
        let d = Depot { vehicles, limits: Limits::default(), target: 50.0, down: false };
        with_request(&d, |req| {
            let mut lp =
                LpDispatcher::new(SmartDispatcher::default(), LpSettings { max_iter: 1, ..LpSettings::default() });
            let err = lp.solve(req, &SmartDispatcher::default().scores(req)).unwrap_err();
            assert_eq!(err.report.status, "MaxIterations");
            // Through the Dispatcher trait the failure is noted and Smart's answer used.
            let a = lp.allocate(req);
            assert_eq!(a.strategy, StrategyKind::Smart);
            assert!(a.note.unwrap().contains("MaxIterations"));
        });
    }
}
