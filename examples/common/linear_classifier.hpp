#pragma once
// A multinomial logistic-regression classifier on flat images (logits = x W^T + b), trained
// with diffgrad's Adam on the full batch. The examples use it to read off which digit a
// generated sample looks like, and the guided-generation example uses its cross-entropy as
// the loss it pushes through the sampler:
//
//   examples::LinearClassifier clf(64, 10);
//   clf.fit(digits.images, digits.labels);
//   clf.predict(x)                                    // class per row
//   double L = clf.cross_entropy(x, target, &dL_dx)   // mean over rows, and its gradient
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <vector>

#include "diffgrad/gradients/optimizer.hpp"

namespace examples {

class LinearClassifier {
public:
  using Matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  LinearClassifier(int dim, int classes)
      : w_(Matrix::Zero(classes, dim)), b_(Eigen::VectorXd::Zero(classes)) {}

  /// Full-batch Adam on the mean cross-entropy plus (l2/2)|W|^2. Returns the training accuracy.
  double fit(const Matrix& x, const std::vector<int>& labels, int iterations = 300,
             double learning_rate = 0.05, double l2 = 1e-3) {
    diffgrad::Adam adam_w({.learning_rate = learning_rate});
    diffgrad::Adam adam_b({.learning_rate = learning_rate});
    const auto n = static_cast<double>(x.rows());
    for (int it = 0; it < iterations; ++it) {
      Matrix p = probabilities(x);  // softmax rows; minus one-hot = dL/dlogits * n
      for (Eigen::Index i = 0; i < x.rows(); ++i) p(i, labels[static_cast<std::size_t>(i)]) -= 1.0;
      Matrix gw = (p.transpose() * x) / n + l2 * w_;
      Eigen::VectorXd gb = p.colwise().sum().transpose() / n;
      adam_w.step(w_, gw);
      adam_b.step(b_, gb);
    }
    return accuracy(x, labels);
  }

  Matrix logits(const Matrix& x) const {
    Matrix z = x * w_.transpose();
    z.rowwise() += b_.transpose();
    return z;
  }

  Matrix probabilities(const Matrix& x) const {
    Matrix z = logits(x);
    for (Eigen::Index i = 0; i < z.rows(); ++i) {
      z.row(i).array() -= z.row(i).maxCoeff();
      z.row(i) = z.row(i).array().exp().matrix();
      z.row(i) /= z.row(i).sum();
    }
    return z;
  }

  std::vector<int> predict(const Matrix& x) const {
    const Matrix z = logits(x);
    std::vector<int> out(static_cast<std::size_t>(x.rows()));
    for (Eigen::Index i = 0; i < x.rows(); ++i) z.row(i).maxCoeff(&out[static_cast<std::size_t>(i)]);
    return out;
  }

  double accuracy(const Matrix& x, const std::vector<int>& labels) const {
    const auto pred = predict(x);
    int ok = 0;
    for (std::size_t i = 0; i < pred.size(); ++i) ok += pred[i] == labels[i];
    return static_cast<double>(ok) / static_cast<double>(pred.size());
  }

  /// Mean over rows of -log p(target | x); writes d/dx into *grad (same shape as x) if given.
  double cross_entropy(const Matrix& x, int target, Matrix* grad = nullptr) const {
    Matrix p = probabilities(x);
    double loss = 0.0;
    for (Eigen::Index i = 0; i < x.rows(); ++i) loss -= std::log(std::max(p(i, target), 1e-300));
    const auto n = static_cast<double>(x.rows());
    if (grad != nullptr) {
      p.col(target).array() -= 1.0;
      *grad = (p * w_) / n;
    }
    return loss / n;
  }

  const Matrix& weights() const { return w_; }
  const Eigen::VectorXd& bias() const { return b_; }

private:
  Matrix w_;
  Eigen::VectorXd b_;
};

} // namespace examples
