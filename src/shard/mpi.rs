//! [`Collective`] over MPI (the `mpi` feature; rsmpi without libffi): each rank is an MPI
//! process, and each reduction is one `MPI_Allreduce` with a built-in operation.

use mpi::collective::{CommunicatorCollectives, SystemOperation};
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};

use super::collective::Collective;
use crate::error::ClipError;

/// The ranks of an MPI job, for [`crate::CpuClipper<Sharded<C>>`] and
/// [`crate::GpuClipper<Sharded<C>>`]. Start the program with `mpiexec -n N`; started alone it is
/// a 1-rank world.
///
/// MPI reports communication failures by aborting the job (rsmpi's
/// `MPI_ERRORS_ARE_FATAL`), so these reductions return errors only on bad calls. A rank
/// that panics would leave the others waiting forever: [`MpiCollective::abort_on_panic`]
/// makes a panic on any rank abort the whole job instead.
pub struct MpiCollective {
    comm: SimpleCommunicator,
    /// Finalizes MPI when dropped (only where this value initialized it).
    _universe: Option<Universe>,
}

impl std::fmt::Debug for MpiCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiCollective")
            .field("rank", &self.rank())
            .field("size", &self.size())
            .finish()
    }
}

impl MpiCollective {
    /// Initializes MPI and returns its world communicator; MPI is finalized when this
    /// value is dropped. Errors when MPI was already initialized (use
    /// [`MpiCollective::from_communicator`] then).
    pub fn init() -> Result<MpiCollective, ClipError> {
        let universe = mpi::initialize().ok_or_else(|| {
            ClipError::Collective(
                "MPI is already initialized; use MpiCollective::from_communicator".into(),
            )
        })?;
        Ok(MpiCollective {
            comm: universe.world(),
            _universe: Some(universe),
        })
    }

    /// Reduces over `comm` (a world or a split communicator the caller manages).
    pub fn from_communicator(comm: SimpleCommunicator) -> MpiCollective {
        MpiCollective {
            comm,
            _universe: None,
        }
    }

    /// The communicator.
    pub fn communicator(&self) -> &SimpleCommunicator {
        &self.comm
    }

    /// Installs a panic hook that, after the usual message, aborts every rank of the job
    /// (`MPI_Abort`), so a panic on one rank ends the job instead of hanging it.
    pub fn abort_on_panic() {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            if mpi::is_initialized() && !mpi::is_finalized() {
                SimpleCommunicator::world().abort(101);
            }
        }));
    }

    /// Waits until every rank has arrived.
    pub fn barrier(&self) {
        self.comm.barrier();
    }

    fn all_reduce<T: mpi::datatype::Equivalence + Copy + Default>(
        &self,
        values: &mut [T],
        op: SystemOperation,
    ) -> Result<(), ClipError> {
        if values.len() > i32::MAX as usize {
            return Err(ClipError::Collective(format!(
                "{} values are more than one MPI call carries",
                values.len()
            )));
        }
        let send = values.to_vec();
        self.comm.all_reduce_into(&send[..], values, op);
        Ok(())
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn all_reduce_max(&self, values: &mut [f64]) -> Result<(), ClipError> {
        self.all_reduce(values, SystemOperation::max())
    }

    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<(), ClipError> {
        self.all_reduce(values, SystemOperation::sum())
    }

    fn all_reduce_or(&self, values: &mut [u32]) -> Result<(), ClipError> {
        self.all_reduce(values, SystemOperation::bitwise_or())
    }
}
