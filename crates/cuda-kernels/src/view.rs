//! Device buffers as the launchers take them: an owned [`CudaSlice`] or a
//! view into one. A model keeps every parameter in one flat allocation (and
//! its gradients in another); a tensor is a view at its offset, so the
//! launchers that read weights or accumulate gradients accept views.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

/// A device buffer a kernel reads: `&CudaSlice<T>`, `&CudaView<T>` or
/// `&CudaViewMut<T>`.
pub trait DevIn<T> {
    /// The whole buffer as a view.
    fn view(&self) -> CudaView<'_, T>;
}

/// A device buffer a kernel writes: `&mut CudaSlice<T>` or `&mut CudaViewMut<T>`.
pub trait DevOut<T>: DevIn<T> {
    /// The whole buffer as a mutable view.
    fn view_mut(&mut self) -> CudaViewMut<'_, T>;
}

impl<T> DevIn<T> for CudaSlice<T> {
    fn view(&self) -> CudaView<'_, T> {
        self.as_view()
    }
}

impl<T> DevIn<T> for CudaView<'_, T> {
    fn view(&self) -> CudaView<'_, T> {
        self.slice(..)
    }
}

impl<T> DevIn<T> for CudaViewMut<'_, T> {
    fn view(&self) -> CudaView<'_, T> {
        self.as_view()
    }
}

impl<T> DevOut<T> for CudaSlice<T> {
    fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.as_view_mut()
    }
}

impl<T> DevOut<T> for CudaViewMut<'_, T> {
    fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.slice_mut(..)
    }
}
