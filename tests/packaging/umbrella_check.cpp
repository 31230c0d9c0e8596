// The umbrella header must compile with every Eigen version diffgrad accepts (3.3 to 5.x) and
// must not instantiate Eigen's heavy decompositions merely by being included: an explicit
// specialisation after an instantiation is an error, so this file stops compiling as soon as
// any header uses one of these classes outside a template (each costs every including file
// about 2 s of compile time with GCC). Templates that use them with dependent types are fine.
#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <Eigen/LU>

#include "diffgrad/diffgrad.hpp"

template <> class Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> {};
template <> class Eigen::SelfAdjointEigenSolver<Eigen::MatrixXf> {};
template <> class Eigen::PartialPivLU<Eigen::MatrixXd> {};
template <> class Eigen::LLT<Eigen::MatrixXd> {};
template <> class Eigen::LDLT<Eigen::MatrixXd> {};

#ifdef DIFFGRAD_EXPECTED_EIGEN_MAJOR
// Eigen 5 reports itself as 3.5.x in these macros (EIGEN_WORLD_VERSION stays 3).
static_assert(EIGEN_MAJOR_VERSION == DIFFGRAD_EXPECTED_EIGEN_MAJOR,
              "the Eigen headers are not the ones DIFFGRAD_EIGEN5_INCLUDE_DIR points at");
#endif
